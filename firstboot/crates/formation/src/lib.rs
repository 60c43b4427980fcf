//! Cluster formation: safe seed election, serial control-plane joins and parallel worker
//! joins, as a pure state machine.
//!
//! No I/O, no async, no clock reads: [`Node::handle`] takes `now` (a monotonic
//! [`std::time::Duration`] since this process started; it restarts from zero after a reboot, and
//! nothing persisted is a time) and an [`Event`], and returns [`Action`]s for the driver to
//! execute in order. Clocks of different nodes are never compared (Raspberry Pis have no RTC);
//! only durations measured on one node are, and only against that node's own earlier readings.
//!
//! # Protocol: one replicated record, changed only by Paxos rounds (CASPaxos)
//!
//! Every node is a Paxos *acceptor* (it persists a binding promise and the last accepted value
//! before answering). All cluster-wide decisions are changes to one value, the [`Record`]
//! (cluster identity, electorate, slot authority, members, the join slots, addon claim), made by
//! a *round*: the proposer picks a ballot `(n, its id)` higher than any it has seen (persisting
//! `n` first, so a ballot is never reused), collects promises (each carrying the acceptor's last
//! accepted record), takes the record with the highest ballot among them, applies a pure
//! change ([`node::apply`]) and has the result accepted. A round that is refused, or does not
//! finish within `round_timeout`, is dropped and retried later with a higher ballot.
//!
//! Quorums:
//! - before a cluster exists, a round needs `Q = max(expected_nodes, control_plane) / 2 + 1`
//!   promises, and an election write needs `Q` acceptances (2 of 3, 3 of 5);
//! - the election fixes the record's *electorate* `S`: the seed and the best-ranked candidates
//!   it saw, at most [`FormationParams::electorate_cap`] (`2 × control_plane + 1`, at least 5:
//!   7 of a rack of 50 with 3 control-plane nodes); changed only by a handover (below). Every
//!   later round needs,
//!   among its promises and among its acceptances, a strict majority of `S`; a read also needs
//!   `Q` promises in total, unless its proposer saw a record chosen (then it reads from a
//!   majority of `S` and takes the newest of the promises and that record). Such a proposer
//!   sends its Prepares and Accepts to `S` only, so in the steady state a join costs the slot
//!   authority a handful of messages, however large the cluster. The best-ranked nodes are
//!   also granted slots first when they are waiting, so the control plane is normally drawn
//!   from `S`.
//!
//! Operations ([`node::Op`]):
//! - **Elect**: when the expected nodes are visible (or `formation_timeout` has passed with `Q`
//!   visible), the best visible candidate — highest priority, then lowest id; nodes pinned to
//!   worker are not candidates — proposes a record naming itself seed, `ClusterId { seed, term =
//!   ballot n }`, authority and only member. If the round reads an existing record, it rewrites
//!   that one instead and the proposer becomes a joiner: competing claims collapse to one seed.
//! - **Grant / Confirm / Reclaim**: joiners send `SlotRequest` to the slot authority; the
//!   authority grants a slot (`slots` gets `{node, role, seq}`) as one round, only when
//!   [`Record::may_grant`] allows it: a **control-plane** join only while no slot is in use, a
//!   **worker** join only while no control-plane slot is in use and fewer than
//!   `join_parallelism` slots are. The joiner runs `microk8s join <authority ip>` and reports;
//!   the authority records the member and frees its slot (Confirm). A slot unconfirmed for
//!   `slot_timeout` is reclaimed; its holder stays counted as *tentative* (it may have joined)
//!   until it confirms or asks again. The authority keeps the requests it hears (for
//!   `max(3 retry intervals, 2 × the requester's longest backoff)`), also those that arrive
//!   while its own election round is still running, so a freed slot is granted at once; a
//!   waiting node therefore repeats its request with a doubling interval (up to
//!   `grant_max_age / 3`) instead of every retry interval.
//! - **Why workers may join together** (canonical/microk8s-cluster-agent, read at commit
//!   33e4ad06): `pkg/api/v2/join.go` `Join` changes dqlite membership only for control-plane
//!   joiners (the joiner's `update_dqlite` then joins dqlite and restarts it); for a worker
//!   (`worker: true`) it consumes the token (`ConsumeClusterToken`, under `clusterTokensMu` in
//!   `pkg/snap/snap.go`; a persistent token is never removed), updates the dqlite bind address
//!   under `dqliteMu`, patches calico under `calicoMu`, appends the `<token>-kubelet` and
//!   `<token>-proxy` certificate-request tokens (`AddCertificateRequestToken`, under
//!   `certTokensMu`) and lists the control-plane IPs read-only. The joiner then asks for two
//!   certificate signings (`pkg/api/v1/sign_cert.go`), and `SignCertificate` in
//!   `pkg/snap/snap.go` runs the snap's `actions/common/utils.sh sign_certificate` with no lock
//!   held; the snap signs with `openssl x509 … -CAcreateserial` (as `gen_server_cert` in
//!   canonical/microk8s `microk8s-resources/actions/common/utils.sh` does), whose serial file
//!   two simultaneous signings can both touch, so a worker join can rarely fail and must be
//!   retried (the driver does, with backoff). Every node joins with the one persistent token
//!   (no `add-node` while joins are in flight).
//! - **Batch**: the round that records join results (Confirms) also grants the slots they free
//!   to the next waiting requesters (Grants) and claims the addons (ClaimAddons): [`node::apply`]
//!   applies them in order to the record read, each checking its own precondition on the
//!   result of the one before, so a join costs one round instead of two and its effect is
//!   exactly that of the separate rounds chosen back to back with nothing in between.
//! - **One phase per change**: every Accept also names the proposer's next ballot
//!   `(n + 1, proposer)`; an acceptor that accepts promises that ballot in the same persist,
//!   exactly as a `Prepare` arriving right after would, and its "last accepted" for that
//!   promise is the record it just accepted. The proposer's next round starts from those
//!   promises (phase 1 already done) if nothing newer was heard of since (its known and chosen
//!   records are still that one, its own acceptor still holds that promise, and it has seen no
//!   higher ballot); otherwise it runs both phases. So the slot authority pays one phase per
//!   join. An Accept repeated after its acceptor moved on to the next promise is answered
//!   "accepted" again (it was), and a refusal caused by the proposer's own next ballot is a
//!   stale repeat, not competition.
//! - **Takeover**: when the authority has been unseen for `takeover_after`, the best visible
//!   control-plane member makes itself authority (only if the record still names the old one).
//!   The `k`-th best (from 0) does so once it has been unseen for `(k + 1) × takeover_after`:
//!   a best member that never saw a record chosen reads only with the pre-election quorum
//!   `Q`, which fewer than `Q` live nodes never give, and must not hold up the others.
//! - **Elect with replace**: while nothing happened in a cluster (only the seed, no slot ever
//!   pending, no addon claim) and its seed has been unseen for `takeover_after`, the best
//!   waiting candidate replaces it (re-election). The deposed seed learns it at its next round.
//! - **ClaimAddons / AddonsDone**: once `min(3, control_plane)` control-plane members are
//!   recorded, the authority claims the addon enablement for itself; only the claimer ever
//!   issues `EnableAddons`.
//!
//! - **Remove / RemovalDone** (healing, `node/healing.rs`): the authority removes a member it
//!   has not seen (no announcement, no message) for `replace_after` by its own monotonic
//!   clock: the round takes it out of `members` and notes a [`types::Removal`] (who, why, its
//!   address); then the authority alone runs `microk8s remove-node <ip> --force`
//!   ([`Action::RemoveNode`]) and records it done. A control-plane slot is granted only once
//!   every removal is done (both change dqlite's membership). A removed control-plane place
//!   is counted free, so the next joiner (a new machine, or the dead one re-flashed, which
//!   has a new id) joins as control plane, and MicroK8s promotes standbys by itself. The
//!   authority notes the members' addresses in the record (its own too), so a later
//!   authority can name a dead one.
//!   *Dead holders of tentative places* are released the same way: a node whose slot was
//!   reclaimed stays counted (tentative) because its join may have gone through; unseen for
//!   `replace_after` (the authority watches slot and tentative holders as it watches
//!   members), one Remove round takes its place out of `tentative` and notes a removal
//!   with `--force`. Without it a dead tentative control-plane place counted against
//!   `control_plane` forever: no conversion, no HA, no addons. `--force` because nobody can
//!   tell whether that join went through, also for a worker that left to be converted and
//!   then held a reclaimed slot: canonical/microk8s `scripts/wrappers/remove_node.py`
//!   deletes a dqlite endpoint only when one is registered at the address, so `--force` is
//!   needed if it joined and changes nothing if it did not (the node is dead, so no later
//!   join of its own can be cut). The removal also ends a conversion of that node and
//!   releases an addon claim of it not yet carried out (the next claim enables them;
//!   `microk8s enable` is idempotent). A place kept for a pinned control-plane node is
//!   no longer kept once the record removed that node.
//! - **Rejoin** (a machine re-flashed with the same id, `node/healing.rs`): its state is gone
//!   (and its MicroK8s is a fresh single node), but the record still lists it as a member.
//!   It comes back as any new node does (`Preparing`, `Discovering`, `WaitingForSlot`) and
//!   asks for a slot; a `JoinConfirmed` reaching a node that waits for a slot is ignored (a
//!   waiting node never joined: `Confirming` is persisted before the report that makes a
//!   member), and a chosen record listing a waiting node is not taken as its membership once
//!   anything happened in it (only a seed whose election it never saw chosen finds an
//!   untouched record). The authority, asked for a slot by a recorded member that *announces*
//!   that it is no member (preparing, discovering or waiting; for `peer_timeout / 2`, so a
//!   late copy of an older announcement, replaced by the next one, does not count),
//!   readmits it: one round takes it
//!   out of `members` with a [`types::Removal`] ("asked to join again … re-flashed"). For a
//!   control-plane member the stale dqlite entry is then removed first, `microk8s
//!   remove-node <ip> --force` by the authority alone ([`Action::RemoveNode`], as for a dead
//!   member; MicroK8s refuses a join of an address dqlite still knows, "the joining node (IP)
//!   is already known to dqlite", reference A4 and MicroK8s #3694/#2348), and no
//!   control-plane slot is granted before it is done; a worker is no dqlite member and
//!   needs nothing removed. Its request is then granted like any other (the role counted
//!   afresh: it was the dead place). A late duplicate of a slot request sent before an
//!   earlier join readmits nobody: its sender announces `Member` by then. A re-flashed slot
//!   authority announces that it is no member: the best live control-plane member takes
//!   over without waiting `takeover_after`, and it is readmitted like the others.
//! - **Removed while away** (`node/removed.rs`): a node unseen for `replace_after` (powered
//!   off, or cut off) is removed (or its tentative place released) and `remove-node --force`
//!   takes it out of dqlite, but the node itself still believes it is joined
//!   (canonical/microk8s `scripts/wrappers/remove_node.py` changes only the survivors). When
//!   it comes back: a join report from a node holding no slot and no tentative place records
//!   no member (a late report after a release); the authority tells a node acting as a
//!   member of its cluster although removed ([`Message::Removed`], a hint only); the node
//!   runs a Refresh round of its own and, only if the record that round chooses lists it
//!   removed and holding nothing, runs `microk8s leave` ([`Action::Leave`]; `leave.py` resets
//!   it to a lone node) and waits for a slot like a new node. No slot goes to a node whose
//!   own `remove-node` is not done ([`Record::removal_pending`]), so a forced removal never
//!   runs after or during its new join.
//! - **Convert / ConvertLeft / EndConversion** (`node/convert.rs`): when the control plane is
//!   below `control_plane` once every removal is carried out (members, tentative places and
//!   slots counted, standbys among them: MicroK8s promotes those itself), no slot is in use
//!   and no new machine waits for one, the authority converts the best live worker member
//!   (not one pinned to worker): one round writes `converting = {node, reason}`; `apply`
//!   refuses a second while it stands, so two workers are never converted at once, and as
//!   every round it needs a majority of the electorate, so a minority converts nobody. The
//!   authority sends it [`Message::Convert`] (every retry interval) until it left; the worker
//!   runs `microk8s leave` ([`Action::Leave`]) and, once it left, waits for a slot like a new
//!   node (`Member` → `WaitingForSlot` of the same cluster). Its slot request while it
//!   announces that it is no member makes the authority take it out of the members with a
//!   removal marked `left` (ConvertLeft): `microk8s remove-node <ip>` *without* `--force`
//!   ([`Action::RemoveNode`]; a node that left holds no dqlite entry). The control-plane slot
//!   waits for that removal like for any other; the Confirm of its join (without `--worker`)
//!   ends the conversion. Its grant takes a free control-plane place even if one is kept
//!   for a pinned control-plane node not yet in (else it rejoined as a worker, and the next
//!   conversion began). If its slot is reclaimed and it then stays unseen for
//!   `replace_after`, it is released as a dead tentative holder (above), which ends the
//!   conversion with it. EndConversion drops a conversion that is no longer needed (the
//!   worker has not left and the control plane is full again) or whose node left and then
//!   stayed unseen for `replace_after`.
//! - **Handover / FinishHandover**: a dead member of the electorate `S` (unseen for
//!   `replace_after` and no longer a member) is replaced by the best live node outside it (a
//!   control-plane member first, then another member, then a waiting node): one round writes
//!   the *joint* record with `electorate = S'` (`S` minus the dead, plus the live one) and
//!   `electorate_old = S`; while it stands every read and every write needs a majority of
//!   both. The authority's next round, *on that very record seen chosen by itself*, drops
//!   `electorate_old`. One member per handover, one handover at a time.
//!
//! In the steady state only the slot authority proposes: a control-plane member that never
//! saw a record chosen runs its learning round (Refresh) only when it needs one (the newest
//! record it heard of names it authority or addon enabler or another cluster, or the
//! authority is missing), so rounds do not duel and back off. A voter that missed a record
//! (switched off, or its Accept lost, while the others chose it) is not left holding the old
//! one until the next change: the slot authority sends its last round's Accept again to a
//! voter that has not acknowledged it, a copy the network could have delivered late anyway;
//! if the voter promised a higher ballot meanwhile, or the newest record was another member's
//! round, the authority runs a round (`node/catch_up.rs`).
//!
//! A node acts (grants, confirms a member, enables addons, calls itself seed or authority)
//! only on a record it saw *chosen*, i.e. at the end of its own completed round
//! ([`PersistedState::chosen`]); the newest record it merely heard of ([`PersistedState::known`],
//! accepted values and announcements) only routes requests and triggers a confirming round.
//!
//! Roles: pinned roles first; otherwise control plane while fewer than `control_plane` are
//! counted (members + tentative + slot, places kept for pinned control-plane nodes not yet in);
//! then worker. The seed is the first control-plane node. `--controlplane` is never used.
//!
//! # Why there is never a second cluster (safety argument)
//!
//! *Definitions.* A cluster identity is `(seed, term)`. A cluster is **bootstrapped** when a
//! round that grants its first join slot or claims its addons is chosen; only then can any node
//! other than its seed be in it, or any cluster-wide state be created. (The seed's MicroK8s is a
//! lone single-node install until then; a deposed seed simply joins the winner.)
//!
//! 1. *The record is linearizable.* Standard single-decree Paxos safety, applied per round as
//!    in CASPaxos: an acceptor never accepts below its persisted promise, a proposer never
//!    reuses a ballot (its `n` is persisted before use), and every read quorum intersects the
//!    write quorum of the latest chosen record: before the election both are `Q`-sized sets
//!    out of at most `E = max(expected_nodes, control_plane)` participants; after it, both
//!    contain a majority of the same fixed electorate `S` (a read takes the highest-ballot
//!    record it sees, and additionally waits for a majority of *that* record's electorate).
//!    So every round starts from the latest chosen record, or a later partially written one.
//!    A piggybacked promise is such a read done early: the same quorum rules are checked on
//!    those promises before the round writes.
//!    *Reads by a proposer that saw `C` chosen* skip `Q`: every value proposed at a ballot
//!    above `C`'s descends from `C` (induction over ballots, as in Paxos) and so has `C`'s
//!    electorate, and every value *chosen* above `C`'s ballot was accepted by a majority of
//!    it (a write always needs a majority of its proposal's electorate). A majority of `S`
//!    among the promises therefore meets the write quorum of every record chosen after `C`,
//!    and taking the newest of those promises and `C` itself starts from the latest chosen
//!    record: `C`, or one chosen after it. The only write quorum such a read may miss is the
//!    election's (`Q` acceptances, possibly without a majority of `S`), and that record is `C`
//!    or an ancestor of `C`.
//! 2. *One cluster.* A record, once it exists, is only ever replaced by an election when it is
//!    untouched (no slot ever granted, no addon claim). Grants and claims are rounds on the
//!    record, so a grant for cluster `C` can only be chosen while the record is `C`; after it,
//!    `C` is touched forever and can never be replaced. Hence all grants in history belong to
//!    one cluster identity, and no node ever joins two clusters. A batch is one write of one
//!    value (point 1 is unchanged), and the rules below are checked per change on the record
//!    the earlier changes of the batch produced, so every intermediate record satisfies them
//!    as if it had been chosen by a round of its own.
//! 3. *A minority never forms*: an election write needs `Q` acceptances.
//! 4. *Joins never overlap unsafely.* The slots are a field of the record; a grant is a round
//!    that checks [`Record::may_grant`] on the record it read: a control-plane slot only when no
//!    slot is held (so no two control-plane joins, and no worker join beside one), a worker slot
//!    only beside worker slots and below `join_parallelism`. A slot is freed by its holder's
//!    confirmed report or reclaimed after `slot_timeout`, measured by the authority from when it
//!    saw the grant. The joiner starts only on a grant answering a
//!    request it sent at most `grant_max_age` ago (the grant was chosen after that send), and
//!    the driver kills the join after `join_timeout`; `validate` demands
//!    `slot_timeout > 5/4 (join_timeout + grant_max_age)`, so the join has ended before any
//!    reclaim. A restarted joiner never resumes a join without a fresh grant, and request ids
//!    carry the persisted boot count, so a grant for a request from before a crash is ignored.
//! 5. *Control-plane count.* A role is computed inside the grant round from the record, counting
//!    members, the slot and tentative holders (who may have joined), so it never exceeds
//!    `control_plane`.
//! 6. *Addons once.* The claim is a round that succeeds only when no claim exists; only the
//!    claimer enables (again after a crash, because `microk8s enable` is idempotent).
//!
//! 7. *Handover keeps the record linearizable.* Write the quorum sets of a record `R` as
//!    `Q(R)`: `{S}`, or `{S', S}` while a joint step stands. (a) Every proposal `P` built on a
//!    base `B` has `B.electorate ∈ Q(P)`: a handover keeps `S` as `electorate_old`, other
//!    changes keep both fields, and a finish keeps `S'`. (b) A joint step ends only in a round
//!    whose base is the joint record its proposer saw chosen (`Node::try_write` restores
//!    `electorate_old` otherwise), so before any record drops `S` from its quorum sets, a
//!    record with `electorate_old = S` was *chosen*, i.e. accepted by a majority of `S`.
//!    (c) A read holds a majority of every set of `Q(H)`, `H` the newest of its promises and
//!    the record it saw chosen; a write needs a majority of every set of `Q(P)`. Claim: the
//!    read misses no chosen record `L` newer than `H`. Let `R` be the newest chosen record
//!    not newer than `H` (it exists: the reader's own chosen record, or, for a reader that saw
//!    none, the election's, which the `Q` read meets). `H` and `L` both descend from `R`
//!    (Paxos: every proposal above a chosen ballot builds on it), and `S = R.electorate` is
//!    still in `Q(H)`, since otherwise by (b) a record with `electorate_old = S` was chosen
//!    between `R` and `H`, newer than `R`. If `S ∈ Q(L)`, `L`'s acceptors include a majority
//!    of `S` and meet the read. Otherwise by (b) a record `J` with `electorate_old = S` was
//!    chosen between `R` and `L`; it is newer than `H` (by the choice of `R`), accepted by a
//!    majority of `S`, and an acceptor's accepted ballot only grows, so the read sees `J` or
//!    later: newer than `H`, a contradiction. So every read starts from the latest chosen
//!    record (or a later partial one), through any number of handovers; points 2 to 6 are
//!    unchanged (a handover changes no slot, member or claim).
//!    *Why a majority of the old electorate must still live:* the joint write needs it, so a
//!    handover happens only while a majority of `S` is live, proactively, as each member is
//!    found dead (`replace_after`), never after the fact. Were a majority of `S` gone for good
//!    at once, no round could ever be chosen again (nothing can tell it from a partition that
//!    heals later with the old majority holding newer records), and the cluster's record stays
//!    as it is: MicroK8s itself keeps running while dqlite has its own quorum, but nothing new
//!    joins until a person acts. Losses further apart than `replace_after` plus one round are
//!    survived one by one, down to the last live majority.
//!    *Who decides a removal:* only the slot authority proposes it, by a round needing a
//!    majority of the electorate, so a minority partition (even one holding the authority)
//!    removes nobody, and `apply` re-checks membership, so a member is removed once. The
//!    same holds for releasing a dead tentative holder: `apply` releases only a node that
//!    is no member and still holds the place in the record read, so of two rounds deciding
//!    it the second changes nothing, and `remove-node` runs only on the authority named by
//!    a record it saw chosen (point 5 is unchanged: releasing a place only lowers the
//!    count, and the next control-plane grant still waits for the removal to be done).
//!    *Addons after a removal:* a claim is released only together with the removal of its
//!    holder before it recorded them done; the removed node is out of dqlite, so an enable
//!    of its own no longer reaches the cluster, and the new claimer's enable is the only one
//!    that does (point 6 holds for the live cluster; enabling again is idempotent).
//!    *A removed node that comes back* is never a member again on its own word: `apply`
//!    makes a member only of a node that holds a slot or a tentative place, and a removal
//!    takes both, so after its removal a node is recorded again only through a new grant,
//!    which waits until its `remove-node` is done (point 4 is unchanged: that grant is a
//!    slot like any other). It leaves only on a record it saw chosen at the end of its own
//!    round, listing it removed: a removal decided by a majority of the electorate, so a
//!    minority, or a forged or stale [`Message::Removed`], never makes a node leave; and a
//!    node in `Member`/`Confirming` that such a record does not list was removed (it was
//!    listed, or held a slot, in a record chosen before its phase; only a removal takes
//!    that away). Known limit: a stale authority (one that was away itself) acts on its old
//!    chosen record until its first round, and may run a `remove-node` that record holds
//!    undone; the new grant waits for it, but the removal of a node that meanwhile joined
//!    again through another authority is only skipped when its address is recorded as a
//!    member's.
//!    *Takeover escalation* changes only who proposes: a takeover is a round like any
//!    other, and `apply` takes over only from the authority the record still names.
//!
//! Assumptions: acceptor state survives crashes (`Persist` is durable before later actions;
//! a machine re-flashed with the same id breaks this for itself, a known limit: if it is in
//! the electorate, its lost promise and accepted record let a read quorum that includes it
//! miss the latest record when that record's other acceptors are all outside the read, e.g.
//! chosen by {A, B, X} of five, read from {X, C, D}. The slot authority sends every round
//! to the whole electorate, and re-sends its Accept to a voter that has not acknowledged it
//! (catch-up, `node/catch_up.rs`; the property tests demand that every live voter ends up
//! holding the newest chosen record), so in practice all live members hold the latest record,
//! but nothing here proves it. Machine-id based ids make a re-flashed machine a new node, never
//! an amnesic acceptor);
//! at most `E` nodes take part in the election (a node that sees any cluster announcement never
//! proposes one; a re-imaged node has a new id and comes in as a late node); clock *rates*
//! agree within 25 % (nothing depends on clock values).
//!
//! # State machine (persisted [`Phase`])
//!
//! ```text
//!  Preparing --NodePrepared(ok)--> Discovering
//!                                   |  \
//!          cluster announced/known  |   \ I am best candidate and (all expected visible or
//!                                   |    \ timeout with a quorum visible): Elect round
//!                                   v     v
//!                           WaitingForSlot   (round chose my record) -----> Member{cp} (seed,
//!                           ^   |  ^    ^                                    authority)
//!           join failed /   |   |  |    | deposed seed (record replaced    ^
//!           restart while   |   |  |    |  by a re-election)               |
//!           Joining         |   |  |    +----------------------------------+
//!                           |   | SlotGrant (fresh request, a slot free for its role)
//!                           |   v
//!                         Joining{slot} --JoinFinished(ok)--> Confirming --JoinConfirmed--> Member{role}
//!                           |                                    (repeats JoinReport)
//!                           +--JoinFinished(err)--> WaitingForSlot
//! ```
//! Within `Member`, a control-plane node may be the slot *authority* (grants, confirms,
//! reclaims, claims addons) or take over that duty; any node in any phase answers as acceptor.
//! Not drawn: a waiting node whose Refresh round finds no record at all goes back to
//! `Discovering`; a waiting node follows a newer cluster it hears of. Debug builds check every
//! phase change against this machine (`phase_change_allowed` in `node/mod.rs`, which also
//! demands that a node joins only the cluster it was granted a slot in and that only a
//! deposed seed leaves `Member`), so the property tests fail loudly when a change breaks it.
//!
//! # Driver contract
//!
//! - Execute actions in order; a [`Action::Persist`] is durable (temp file, fsync, rename)
//!   before the next action runs. Resume with [`Node::new`] and the last persisted state.
//!   (The core never emits two `Persist` in a row: each holds the whole state, so it drops
//!   all but the last of a run of them.)
//! - Deliver verified announcements as [`Event::PeerSeen`] (also unchanged refreshes: they keep
//!   the peer alive; a peer unseen for `peer_timeout` counts as gone) and messages from
//!   authenticated peers as [`Event::Message`] (they keep the sender alive too; an
//!   [`Event::PeerLost`] is only a hint); send [`Event::Tick`] about once a second.
//! - Feed [`Event::JoinPointKnown`] once this node's MicroK8s is installed (its address and
//!   its cluster agent's certificate fingerprint): a slot authority grants nothing before, since
//!   every [`Message::SlotGrant`] carries the granter's [`JoinPoint`]. The joiner dials the
//!   grant's join point, never an address from the (unsigned) mDNS records.
//! - [`Action::Join`] runs `microk8s join <via.ip>:25000/<token>/<via.fingerprint>` (plus
//!   `--worker` for workers, never `--controlplane`) and waits for Ready, killed after its
//!   `timeout`; it must report success if this node already is a member of that cluster.
//!   `microk8s join` checks the fingerprint on the TLS connection before it sends the token, so
//!   a forged address costs at most this join, never the token.
//! - Inventory pins are keyed by [`NodeId`]: [`FormationParams::from_config`] keys them by the
//!   MAC-derived id, so a cluster with pinned roles should use [`NodeId::from_mac`] ids.
//!
//! # Code layout
//!
//! - `types.rs`: the plain data ([`Record`], [`Phase`], [`PersistedState`], [`FormationParams`]);
//! - `events.rs`: the core's inputs and outputs ([`Event`], [`Action`], [`Message`]);
//! - `announce.rs`: the [`Announcement`] and its mDNS TXT form;
//! - `node/`: the [`Node`] state machine, one file per role (`mod.rs` lists them), the pure
//!   record operations in `node/record.rs`.
//!
//! To extend: add record fields with `#[serde(default)]`, a new [`node::Op`] with its pure
//! transition in [`node::apply`] (`node/record.rs`), and cover it in `tests/formation_*.rs`.

pub mod announce;
pub mod events;
pub mod node;
pub mod types;

pub use announce::{Announcement, AnnouncementError, ANNOUNCEMENT_VERSION};
pub use events::{Action, Event, JoinPoint, Message};
pub use node::{Node, Op, Status};
pub use types::{
    majority, Accepted, AcceptorState, Ballot, ClusterId, Conversion, FormationParams, NodeId,
    NodeIdError, ParamsError, PendingLeave, PersistedState, Phase, PhaseSummary, Record, Removal,
    Slot,
};
