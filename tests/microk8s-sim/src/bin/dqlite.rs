//! `dqlite`: the simulator's stand-in for `/snap/microk8s/current/bin/dqlite` (`.cluster` only).
fn main() {
    std::process::exit(microk8s_sim::cli::dqlite_main(
        std::env::args().skip(1).collect(),
    ));
}
