# Sourced by the simulator's wrappers: its settings and this node's own address.
# The node's address is its first IPv4 address outside QEMU user-mode networking's
# 10.0.2.0/24 (the management NIC has 10.0.2.15 on every VM, so it must never be given to
# MicroK8s peers), or the first one starting with RACKSEED_SIM_SUBNET when that is set.
[ -r /etc/rackseed-sim.env ] && . /etc/rackseed-sim.env
if [ -n "${RACKSEED_SIM_SUBNET:-}" ]; then
    MICROK8S_SIM_IP=$(hostname -I | tr ' ' '\n' | grep -m1 "^${RACKSEED_SIM_SUBNET}" || true)
else
    MICROK8S_SIM_IP=$(hostname -I | tr ' ' '\n' | grep -v -e '^10\.0\.2\.' -e ':' -e '^$' | head -n1)
fi
export MICROK8S_SIM_IP MICROK8S_SIM_JOIN_DELAY_MS MICROK8S_SIM_ENABLE_DELAY_MS MICROK8S_SIM_HEARTBEAT_MS
