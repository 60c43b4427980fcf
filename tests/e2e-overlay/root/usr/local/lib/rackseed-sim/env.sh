# Sourced by the simulator wrappers: the simulator's settings for this test image.
# The node's own address is its cluster NIC's (the management NIC's 10.0.2.15 is the same on
# every VM, so it must never be announced to MicroK8s peers).
[ -r /etc/rackseed-sim.env ] && . /etc/rackseed-sim.env
MICROK8S_SIM_IP=$(hostname -I | tr ' ' '\n' | grep -m1 "^${RACKSEED_SIM_SUBNET:-192.168.76.}" || true)
export MICROK8S_SIM_IP MICROK8S_SIM_JOIN_DELAY_MS MICROK8S_SIM_ENABLE_DELAY_MS MICROK8S_SIM_HEARTBEAT_MS
