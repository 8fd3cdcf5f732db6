//! How a node of a cluster decides which shards to lease (ARCHITECTURE.md, "Kinesis
//! shards leased through the lake"). The lease objects themselves live behind
//! [`Leases`]; this module holds the rounds ([`Keeper`]: renew what it holds, notice
//! what it lost, take free or expired shards up to its fair share, give back what is
//! over it) and the task that runs them ([`spawn`]) beside the reader, so that a reader
//! held by backpressure never lets its leases lapse.
//!
//! Expiry is observed, as the Kinesis Client Library does it: another node's lease is
//! expired once its newest epoch has not changed for `lease_time` by this node's own
//! clock, so the nodes' clocks need not agree.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use sluice_core::Checkpointed;
use sluice_core::lease::{Lease, LeaseScan};
use sluice_core::schema::SourcePositions;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::source::{FINAL_ACK_WAIT, Leases, Peers};

/// What one round decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Round {
    /// Shards won: read them after the furthest position any checkpoint holds.
    pub taken: Vec<String>,
    /// Shards lost (taken by another node, or not renewed in time): stop reading.
    pub lost: Vec<String>,
    /// A shard over the fair share: stop reading it and release it once a checkpoint
    /// covers what was read.
    pub surplus: Option<String>,
}

/// What a round would do, before any object is created.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    renew: Vec<(String, u64)>,
    lost: Vec<String>,
    take: Vec<(String, u64)>,
    surplus: Option<String>,
}

/// One node's leases on one source's shards.
#[derive(Debug)]
pub(crate) struct Keeper {
    source: String,
    node: String,
    store: Arc<dyn Leases>,
    lease_time: Duration,
    round: u64,
    /// Shard → the epoch this node created last, and when.
    held: BTreeMap<String, (u64, Instant)>,
    /// The shard being given back, if any.
    leaving: Option<String>,
    /// The newest scan.
    scan: LeaseScan,
    /// Shard → its newest epoch seen, and when this node first saw it.
    seen: BTreeMap<String, (u64, Instant)>,
    /// Member → its newest tag seen, and when this node first saw it.
    members: BTreeMap<String, (String, Instant)>,
}

impl Keeper {
    pub(crate) fn new(
        source: &str,
        node: &str,
        store: Arc<dyn Leases>,
        lease_time: Duration,
    ) -> Self {
        Self {
            source: source.to_owned(),
            node: node.to_owned(),
            store,
            lease_time,
            round: 0,
            held: BTreeMap::new(),
            leaving: None,
            scan: LeaseScan::default(),
            seen: BTreeMap::new(),
            members: BTreeMap::new(),
        }
    }

    /// How often rounds run: three renewals fit in one lease time.
    pub(crate) fn round_every(&self) -> Duration {
        (self.lease_time / 3).max(Duration::from_millis(100))
    }

    /// Whether some node marked `shard` finished (a checkpoint covers its end).
    pub(crate) fn finished(&self, shard: &str) -> bool {
        self.scan.shards.get(shard).is_some_and(|l| l.finished)
    }

    /// The shards this node holds.
    pub(crate) fn held(&self) -> impl Iterator<Item = &str> {
        self.held.keys().map(String::as_str)
    }

    /// Says this node is alive and lists the leases. On failure nothing is decided
    /// this round (the caller stops reading shards whose lease ran out: [`Self::overdue`]).
    ///
    /// What the list shows is stamped with the time it came back, not the time it was
    /// asked for: a list held up by the network (a partition) must not make the other
    /// nodes' leases look older than they are, or a node coming back from a partition
    /// would see every lease as expired and take them all.
    pub(crate) async fn observe(&mut self) -> Result<(), String> {
        self.round += 1;
        self.store.heartbeat(&self.source, self.round).await?;
        let scan = self.store.scan(&self.source).await?;
        self.record(scan, Instant::now());
        Ok(())
    }

    /// Takes `scan` as the newest, listed at `now`: epochs and tags that changed are
    /// seen afresh.
    fn record(&mut self, scan: LeaseScan, now: Instant) {
        for (shard, lease) in &scan.shards {
            if self.seen.get(shard).is_none_or(|(e, _)| *e != lease.epoch) {
                self.seen.insert(shard.clone(), (lease.epoch, now));
            }
        }
        for (member, tag) in &scan.members {
            if self.members.get(member).is_none_or(|(t, _)| t != tag) {
                self.members.insert(member.clone(), (tag.clone(), now));
            }
        }
        self.members.retain(|m, _| scan.members.contains_key(m));
        self.scan = scan;
    }

    /// Held shards not renewed for a lease time: another node may have them by now.
    pub(crate) fn overdue(&mut self, now: Instant) -> Vec<String> {
        let lease_time = self.lease_time;
        let overdue: Vec<String> = self
            .held
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= lease_time)
            .map(|(s, _)| s.clone())
            .collect();
        for shard in &overdue {
            self.drop_held(shard);
        }
        overdue
    }

    /// One round over the newest [`observe`](Self::observe): `open` are the shards
    /// that may be read now (listed, not finished, parents finished).
    pub(crate) async fn act(&mut self, open: &BTreeSet<String>, now: Instant) -> Round {
        let plan = self.plan(open, now);
        let mut round = Round {
            lost: plan.lost,
            surplus: plan.surplus,
            ..Round::default()
        };
        for shard in &round.lost {
            self.drop_held(shard);
        }
        for (shard, epoch) in plan.renew {
            match self.create(&shard, epoch, Some(&self.node), false).await {
                Ok(true) => {
                    self.held.insert(shard, (epoch, now));
                }
                Ok(false) => {
                    self.drop_held(&shard);
                    round.lost.push(shard);
                }
                // Kept: retried next round, given up once overdue.
                Err(e) => {
                    tracing::debug!(component = %self.source, shard, error = %e, "renewing a lease failed")
                }
            }
        }
        for (shard, epoch) in plan.take {
            if let Ok(true) = self.create(&shard, epoch, Some(&self.node), false).await {
                self.held.insert(shard.clone(), (epoch, now));
                round.taken.push(shard);
            }
        }
        // Renewals that keep failing: others may take the shard once a lease time
        // has passed since the last one that worked.
        round.lost.extend(self.overdue(now));
        if let Some(shard) = &round.surplus {
            self.leaving = Some(shard.clone());
        }
        round
    }

    /// Lets go of `shard`: released for any node, or marked finished for good.
    pub(crate) async fn release(&mut self, shard: &str, finished: bool) -> Result<(), String> {
        let Some(&(epoch, _)) = self.held.get(shard) else {
            return Ok(());
        };
        self.drop_held(shard);
        self.create(shard, epoch + 1, None, finished)
            .await
            .map(|_| ())
    }

    /// A clean stop: this node is no longer a member.
    pub(crate) async fn leave(&mut self) -> Result<(), String> {
        self.store.leave(&self.source).await
    }

    fn drop_held(&mut self, shard: &str) {
        self.held.remove(shard);
        if self.leaving.as_deref() == Some(shard) {
            self.leaving = None;
        }
    }

    /// Creates lease `epoch` of `shard`, held by this node or (`None`) released.
    async fn create(
        &self,
        shard: &str,
        epoch: u64,
        owner: Option<&str>,
        finished: bool,
    ) -> Result<bool, String> {
        let lease = Lease {
            epoch,
            owner: owner.unwrap_or_default().to_owned(),
            finished,
        };
        self.store.create(&self.source, shard, epoch, lease).await
    }

    fn plan(&self, open: &BTreeSet<String>, now: Instant) -> Plan {
        let mut plan = Plan::default();
        for (shard, &(epoch, _)) in &self.held {
            let newest = self.scan.shards.get(shard).map_or(epoch, |l| l.epoch);
            if newest > epoch {
                plan.lost.push(shard.clone());
            } else {
                plan.renew.push((shard.clone(), epoch + 1));
            }
        }
        let expired = |at: Instant| now.duration_since(at) >= self.lease_time;
        let live = self
            .members
            .iter()
            .filter(|(m, (_, at))| *m != &self.node && !expired(*at))
            .count()
            + 1;
        let share = open.len().div_ceil(live);
        // Held shards that ended here wait for their checkpoint, then go: they count
        // for nothing and are never given back as surplus.
        let readable: Vec<&String> = plan
            .renew
            .iter()
            .map(|(s, _)| s)
            .filter(|s| open.contains(*s))
            .collect();
        let holding = readable.len();
        if holding > share && self.leaving.is_none() {
            plan.surplus = readable.last().map(|s| (*s).clone());
        }
        let mut wanted = share.saturating_sub(holding);
        for shard in open {
            if wanted == 0 {
                break;
            }
            if self.held.contains_key(shard) {
                continue;
            }
            let epoch = match self.scan.shards.get(shard) {
                None => 0,
                Some(lease) if lease.finished => continue,
                Some(lease) if lease.owner.is_empty() => lease.epoch + 1,
                Some(lease) => match self.seen.get(shard) {
                    Some(&(seen, at)) if seen == lease.epoch && expired(at) => lease.epoch + 1,
                    _ => continue,
                },
            };
            plan.take.push((shard.clone(), epoch));
            wanted -= 1;
        }
        plan
    }
}

/// What the lease task tells the reader.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lent {
    /// Read `shard` after `after`: the furthest position any other node's checkpoint
    /// holds (`""`: none).
    Taken { shard: String, after: String },
    /// Stop reading `shard` at once.
    Lost(String),
    /// Stop reading `shard`, flush, and say [`Reading::Leaving`].
    Surplus(String),
}

/// What the reader tells the lease task.
#[derive(Debug)]
pub(crate) enum Reading {
    /// Every shard listed: its parents, and whether it was read to its end here.
    Listed(BTreeMap<String, (Vec<String>, bool)>),
    /// `shard` was read to its end here.
    Ended(String),
    /// The reader stopped reading `shard` (given back) after handing on `last`.
    Leaving { shard: String, last: Option<String> },
}

/// The two ends the reader keeps of its lease task.
pub(crate) struct LeaseLink {
    pub tx: mpsc::UnboundedSender<Reading>,
    pub rx: mpsc::UnboundedReceiver<Lent>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Runs `keeper`'s rounds in a task of their own. Dropping the link's sender stops it:
/// it then waits (bounded) for the final checkpoint, releases every lease it holds
/// and leaves.
pub(crate) fn spawn(
    keeper: Keeper,
    peers: Arc<dyn Peers>,
    checkpoints: watch::Receiver<Checkpointed>,
    checkpoint_now: Arc<Notify>,
) -> LeaseLink {
    let (tx, from_reader) = mpsc::unbounded_channel();
    let (to_reader, rx) = mpsc::unbounded_channel();
    let task = LeaseTask {
        keeper,
        peers,
        checkpoints,
        checkpoint_now,
        listed: BTreeMap::new(),
        ending: BTreeSet::new(),
        leaving: None,
        outage: false,
        to_reader,
    };
    let task = tokio::spawn(task.run(from_reader));
    LeaseLink { tx, rx, task }
}

struct LeaseTask {
    keeper: Keeper,
    peers: Arc<dyn Peers>,
    checkpoints: watch::Receiver<Checkpointed>,
    checkpoint_now: Arc<Notify>,
    /// Shard → its parents, and whether it was read to its end here.
    listed: BTreeMap<String, (Vec<String>, bool)>,
    /// Shards read to their end here, released as finished once a checkpoint has it.
    ending: BTreeSet<String>,
    /// The shard being given back, and the last position the reader handed on.
    leaving: Option<(String, Option<String>)>,
    outage: bool,
    to_reader: mpsc::UnboundedSender<Lent>,
}

impl LeaseTask {
    async fn run(mut self, mut from_reader: mpsc::UnboundedReceiver<Reading>) {
        let mut rounds = tokio::time::interval(self.keeper.round_every());
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = from_reader.recv() => match message {
                    None => break,
                    Some(Reading::Listed(listed)) => {
                        for (shard, (parents, ended)) in listed {
                            let known = self.listed.entry(shard).or_default();
                            known.0 = parents;
                            known.1 |= ended;
                        }
                    }
                    Some(Reading::Ended(shard)) => {
                        self.listed.entry(shard.clone()).or_default().1 = true;
                        self.ending.insert(shard);
                    }
                    Some(Reading::Leaving { shard, last }) => {
                        self.leaving = Some((shard, last));
                        self.checkpoint_now.notify_one();
                        self.on_checkpoint().await;
                    }
                },
                changed = self.checkpoints.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.on_checkpoint().await;
                }
                _ = rounds.tick() => self.round().await,
            }
        }
        self.stop().await;
    }

    fn name(&self) -> &str {
        &self.keeper.source
    }

    async fn round(&mut self) {
        let observed = self.keeper.observe().await;
        let now = Instant::now();
        if let Err(error) = observed {
            if !self.outage {
                self.outage = true;
                tracing::warn!(component = %self.name(), %error, "cannot read or renew the shard leases; retrying each round");
            }
            for shard in self.keeper.overdue(now) {
                tracing::warn!(component = %self.name(), %shard, "lease not renewed in time; stopped reading the shard");
                let _ = self.to_reader.send(Lent::Lost(shard));
            }
            return;
        }
        if self.outage {
            self.outage = false;
            tracing::info!(component = %self.name(), "shard leases readable again");
        }
        let open = self.open();
        let round = self.keeper.act(&open, now).await;
        for shard in round.lost {
            tracing::warn!(component = %self.name(), %shard, "lost the shard's lease (another node took it, or renewals failed for a lease time); stopped reading it");
            let _ = self.to_reader.send(Lent::Lost(shard));
        }
        if !round.taken.is_empty() {
            self.start(round.taken).await;
        }
        if let Some(shard) = round.surplus {
            tracing::info!(component = %self.name(), %shard, "over this node's share; giving the shard back once a checkpoint covers it");
            let _ = self.to_reader.send(Lent::Surplus(shard));
        }
    }

    /// Shards that may be read now: listed, not finished (here or by a lease), and
    /// every parent finished or no longer listed (trimmed).
    fn open(&self) -> BTreeSet<String> {
        let done = |id: &str| self.listed.get(id).is_some_and(|l| l.1) || self.keeper.finished(id);
        self.listed
            .iter()
            .filter(|(id, (parents, _))| {
                !done(id)
                    && parents
                        .iter()
                        .all(|p| !self.listed.contains_key(p) || done(p))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Hands shards just won to the reader, each with the furthest position the other
    /// nodes' checkpoints hold (their half-done checkpoints completed first); a shard
    /// whose end one holds is marked finished instead.
    async fn start(&mut self, taken: Vec<String>) {
        let name = self.name().to_owned();
        let peers = match self.peers.take_over(&name, &taken).await {
            Ok(peers) => peers,
            Err(error) => {
                tracing::warn!(component = %name, %error, "cannot read the other nodes' checkpoints; letting the shards just leased go again");
                for shard in &taken {
                    self.release(shard, false).await;
                }
                return;
            }
        };
        for shard in taken {
            let after = furthest_of(&peers, &shard);
            if after == SourcePositions::END {
                tracing::info!(component = %name, %shard, "a checkpoint holds the shard's end; marking it finished");
                self.listed.entry(shard.clone()).or_default().1 = true;
                self.release(&shard, true).await;
                continue;
            }
            tracing::info!(component = %name, %shard, %after, "won the shard's lease");
            let _ = self.to_reader.send(Lent::Taken { shard, after });
        }
    }

    /// A checkpoint is durable: release what it covers of the shards let go.
    async fn on_checkpoint(&mut self) {
        let positions = self.checkpointed();
        let ended: Vec<String> = self
            .ending
            .iter()
            .filter(|id| {
                positions
                    .get(*id)
                    .is_some_and(|p| p == SourcePositions::END)
            })
            .cloned()
            .collect();
        for shard in ended {
            self.ending.remove(&shard);
            self.release(&shard, true).await;
        }
        if let Some((shard, last)) = self.leaving.clone()
            && last.as_deref().is_none_or(|l| {
                positions
                    .get(&shard)
                    .is_some_and(|p| compare_positions(p, l) != Ordering::Less)
            })
        {
            self.leaving = None;
            self.release(&shard, false).await;
            tracing::info!(component = %self.name(), %shard, "shard given back");
        }
    }

    /// The newest durable checkpoint's positions of this source.
    fn checkpointed(&self) -> BTreeMap<String, String> {
        self.checkpoints
            .borrow()
            .get(self.name())
            .cloned()
            .unwrap_or_default()
    }

    /// Releases `shard`'s lease (logged, not fatal: an unreleased lease expires).
    async fn release(&mut self, shard: &str, finished: bool) {
        if let Err(error) = self.keeper.release(shard, finished).await {
            tracing::warn!(component = %self.name(), %shard, %error, "releasing the shard's lease failed; it expires instead");
        }
    }

    /// A clean stop: once the final checkpoint is durable, every lease is released
    /// (marked finished where it holds the end), and the node leaves.
    async fn stop(mut self) {
        if !tokio::time::timeout(FINAL_ACK_WAIT, self.checkpoints.changed())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            tracing::warn!(component = %self.name(), "no final checkpoint; the shard leases expire instead of being released");
            return;
        }
        let positions = self.checkpointed();
        let held: Vec<String> = self.keeper.held().map(str::to_owned).collect();
        for shard in held {
            let finished = positions
                .get(&shard)
                .is_some_and(|p| p == SourcePositions::END);
            self.release(&shard, finished).await;
        }
        if let Err(error) = self.keeper.leave().await {
            tracing::debug!(component = %self.name(), %error, "leaving the lease members failed");
        }
    }
}

/// The furthest position of `shard` in `positions` (`""` if none holds it).
fn furthest_of(positions: &[SourcePositions], shard: &str) -> String {
    positions
        .iter()
        .filter_map(|p| p.offsets.get(shard))
        .max_by(|a, b| compare_positions(a, b))
        .cloned()
        .unwrap_or_default()
}

/// How position `a` compares with `b`: sequence numbers are decimal text of up to 56
/// digits (past any integer type), compared by length, then digit by digit; the end of
/// a shard is past every record, and `""` (nothing read) before them.
pub(crate) fn compare_positions(a: &str, b: &str) -> Ordering {
    let rank = |p: &str| match p {
        "" => 0,
        SourcePositions::END => 2,
        _ => 1,
    };
    rank(a).cmp(&rank(b)).then_with(|| {
        let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
        a.len().cmp(&b.len()).then_with(|| a.cmp(b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::LeaseFuture;

    /// Unit tests of the planning only: a store that is never called.
    #[derive(Debug)]
    struct Unused;

    impl Leases for Unused {
        fn scan<'a>(&'a self, _: &'a str) -> LeaseFuture<'a, LeaseScan> {
            unreachable!()
        }
        fn create<'a>(&'a self, _: &'a str, _: &'a str, _: u64, _: Lease) -> LeaseFuture<'a, bool> {
            unreachable!()
        }
        fn heartbeat<'a>(&'a self, _: &'a str, _: u64) -> LeaseFuture<'a, ()> {
            unreachable!()
        }
        fn leave<'a>(&'a self, _: &'a str) -> LeaseFuture<'a, ()> {
            unreachable!()
        }
    }

    const LEASE: Duration = Duration::from_secs(10);

    fn keeper() -> Keeper {
        Keeper::new("k", "a", Arc::new(Unused), LEASE)
    }

    fn lease(epoch: u64, owner: &str) -> Lease {
        Lease {
            epoch,
            owner: owner.into(),
            finished: false,
        }
    }

    fn open(shards: &[&str]) -> BTreeSet<String> {
        shards.iter().map(|s| (*s).to_owned()).collect()
    }

    fn members(ids: &[(&str, &str)]) -> BTreeMap<String, String> {
        ids.iter()
            .map(|(m, t)| ((*m).to_owned(), (*t).to_owned()))
            .collect()
    }

    #[test]
    fn a_node_alone_takes_every_free_shard_and_renews_what_it_holds() {
        let now = Instant::now();
        let mut k = keeper();
        k.record(LeaseScan::default(), now);
        let plan = k.plan(&open(&["s0", "s1"]), now);
        assert_eq!(plan.take, [("s0".to_owned(), 0), ("s1".to_owned(), 0)]);
        k.held.insert("s0".into(), (0, now));
        let scan = LeaseScan {
            shards: BTreeMap::from([("s0".into(), lease(0, "a")), ("s1".into(), lease(3, ""))]),
            members: members(&[("a", "1")]),
        };
        k.record(scan, now);
        let plan = k.plan(&open(&["s0", "s1"]), now);
        assert_eq!(plan.renew, [("s0".to_owned(), 1)]);
        assert_eq!(
            plan.take,
            [("s1".to_owned(), 4)],
            "a released lease is free"
        );
    }

    #[test]
    fn two_live_nodes_split_the_shards_and_a_lease_is_taken_only_once_expired() {
        let t0 = Instant::now();
        let mut k = keeper();
        let scan = |b_epoch: u64, b_tag: &str| LeaseScan {
            shards: BTreeMap::from([
                ("s0".into(), lease(b_epoch, "b")),
                ("s1".into(), lease(b_epoch, "b")),
            ]),
            members: members(&[("a", "1"), ("b", b_tag)]),
        };
        k.record(scan(5, "x"), t0);
        let four = open(&["s0", "s1", "s2", "s3"]);
        // b holds two of four; the share of each of two is two: a takes the free ones.
        let plan = k.plan(&four, t0);
        assert_eq!(plan.take, [("s2".to_owned(), 0), ("s3".to_owned(), 0)]);
        // b renews: nothing of b's is expired, however long it holds.
        let t1 = t0 + LEASE;
        k.record(scan(6, "y"), t1);
        assert!(k.plan(&open(&["s0", "s1"]), t1).take.is_empty());
        // b goes silent: after a lease time its shards expire, and b no longer counts.
        let t2 = t1 + LEASE;
        k.record(scan(6, "y"), t2);
        let plan = k.plan(&open(&["s0", "s1"]), t2);
        assert_eq!(plan.take, [("s0".to_owned(), 7), ("s1".to_owned(), 7)]);
    }

    #[test]
    fn a_lost_lease_stops_renewing_and_a_node_over_its_share_gives_one_back() {
        let now = Instant::now();
        let mut k = keeper();
        for s in ["s0", "s1", "s2"] {
            k.held.insert(s.into(), (2, now));
        }
        let scan = LeaseScan {
            shards: BTreeMap::from([
                ("s0".into(), lease(2, "a")),
                ("s1".into(), lease(2, "a")),
                ("s2".into(), lease(3, "b")),
            ]),
            members: members(&[("a", "1"), ("b", "1"), ("c", "1")]),
        };
        k.record(scan, now);
        // Three nodes, three shards: a keeps one.
        let plan = k.plan(&open(&["s0", "s1", "s2"]), now);
        assert_eq!(plan.lost, ["s2"]);
        assert_eq!(plan.renew, [("s0".to_owned(), 3), ("s1".to_owned(), 3)]);
        assert_eq!(plan.surplus.as_deref(), Some("s1"));
        // A held shard that ended here (not open) is neither counted nor given back.
        let plan = k.plan(&open(&["s1", "s2"]), now);
        assert_eq!(
            plan.surplus, None,
            "a holds s1 of two open shards among three nodes"
        );
        // While one shard is leaving, no other is picked.
        k.leaving = Some("s1".into());
        assert_eq!(k.plan(&open(&["s0", "s1", "s2"]), now).surplus, None);
    }

    #[test]
    fn positions_compare_as_numbers_with_the_end_last() {
        let a = "49590338271490256608559692538361571095921575989136588898";
        let b = "49590338271490256608559692540925702759324208523137515618";
        assert_eq!(compare_positions(a, b), Ordering::Less);
        assert_eq!(compare_positions("10", "9"), Ordering::Greater);
        assert_eq!(compare_positions("", "9"), Ordering::Less);
        assert_eq!(
            compare_positions(SourcePositions::END, b),
            Ordering::Greater
        );
        assert_eq!(compare_positions(b, b), Ordering::Equal);
        let positions = |p: &str| SourcePositions {
            offsets: BTreeMap::from([("s".to_owned(), p.to_owned())]),
            ..SourcePositions::default()
        };
        assert_eq!(furthest_of(&[positions("9"), positions("10")], "s"), "10");
        assert_eq!(furthest_of(&[], "s"), "");
    }

    #[test]
    fn finished_shards_are_never_taken_and_overdue_leases_are_dropped() {
        let now = Instant::now();
        let mut k = keeper();
        let mut done = lease(4, "");
        done.finished = true;
        k.record(
            LeaseScan {
                shards: BTreeMap::from([("s0".into(), done)]),
                members: BTreeMap::new(),
            },
            now,
        );
        assert!(k.finished("s0"));
        assert!(k.plan(&open(&["s0"]), now).take.is_empty());
        k.held.insert("s1".into(), (0, now));
        assert!(k.overdue(now + LEASE / 2).is_empty());
        assert_eq!(k.overdue(now + LEASE), ["s1"]);
        assert_eq!(k.held().count(), 0);
    }
}
