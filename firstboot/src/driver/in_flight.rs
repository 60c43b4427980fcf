//! The messages on their way: a message the formation core asks to send again while the same
//! message to the same peer and address is still on its way is not sent a second time.
//!
//! Why: the core repeats what went unanswered every `retry_interval` (a round's Prepares and
//! Accepts to the acceptors that have not answered, a confirming joiner's report), and on a
//! loaded machine an answer can take longer than that. Every repeat then became one more
//! request beside the first, often on a connection of its own (one more TLS handshake), at
//! the peer that was already too slow to answer: at N = 50 on 2 cores the seed's election
//! round sent each of its 49 Prepares up to three times. A repeat that waits for the first
//! loses nothing: the first one's answer comes back as the repeat's would (messages are
//! idempotent), and once it has failed or been answered the next repeat goes out as before.
//! Each send is bounded by the coordinator client's own timeout, so a peer that never answers
//! holds its repeats back for at most that long, the time a repeat sent beside it would have
//! waited too. Messages that differ (a new slot request id, a later ballot) always go out.
//!
//! To extend: nothing to do for a new message kind; equality of [`Message`] is the key.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rackseed_formation::{Message, NodeId};

/// One message to one peer at one address.
type Key = (NodeId, SocketAddr, Message);

/// The messages on their way (see the module docs). Cheap to clone; every clone is the same set.
#[derive(Debug, Clone, Default)]
pub(super) struct InFlight(Arc<Mutex<Vec<Key>>>);

/// A message's place in [`InFlight`]: dropping it (when the send ended, however it ended)
/// frees the place.
#[derive(Debug)]
pub(super) struct OnItsWay {
    set: InFlight,
    key: Key,
}

impl InFlight {
    /// Claims the place of `msg` to `to` at `addr`; `None` while the same message is still on
    /// its way there.
    pub(super) fn claim(&self, to: &NodeId, addr: SocketAddr, msg: &Message) -> Option<OnItsWay> {
        let key = (to.clone(), addr, msg.clone());
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.contains(&key) {
            return None;
        }
        v.push(key.clone());
        Some(OnItsWay {
            set: self.clone(),
            key,
        })
    }

    /// How many messages are on their way.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for OnItsWay {
    fn drop(&mut self) {
        let mut v = self.set.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = v.iter().position(|k| *k == self.key) {
            v.swap_remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rackseed_formation::Ballot;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn prepare(n: u64) -> Message {
        Message::Prepare {
            ballot: Ballot { n, node: id("aa") },
        }
    }

    #[test]
    fn a_repeat_waits_while_the_same_message_is_on_its_way() {
        let f = InFlight::default();
        let addr: SocketAddr = "10.0.0.2:7443".parse().unwrap();
        let first = f.claim(&id("bb"), addr, &prepare(1)).expect("first send");
        assert!(
            f.claim(&id("bb"), addr, &prepare(1)).is_none(),
            "repeat held back"
        );
        // Another message, peer or address goes out.
        let other_msg = f.claim(&id("bb"), addr, &prepare(2)).expect("later ballot");
        let other_peer = f.claim(&id("cc"), addr, &prepare(1)).expect("other peer");
        let moved: SocketAddr = "10.0.0.3:7443".parse().unwrap();
        let other_addr = f.claim(&id("bb"), moved, &prepare(1)).expect("new address");
        assert_eq!(f.len(), 4);
        // Once the first send ended (answered or failed), the repeat goes out.
        drop(first);
        assert_eq!(f.len(), 3);
        let again = f
            .claim(&id("bb"), addr, &prepare(1))
            .expect("after the first ended");
        drop((again, other_msg, other_peer, other_addr));
        assert_eq!(f.len(), 0);
    }
}
