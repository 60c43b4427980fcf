//! `microk8s`: the simulator's CLI (see the crate docs and README).
fn main() {
    std::process::exit(microk8s_sim::cli::microk8s_main(
        std::env::args().skip(1).collect(),
    ));
}
