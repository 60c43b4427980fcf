//! The driver's side of datastore backups ([`crate::backup`]): on a control-plane member it
//! opens the archive store and installs it (and the restore handler) on the coordinator; on the
//! record's slot authority it runs the schedule, one backup at a time, copying each archive
//! to the record's other control-plane members; everywhere it puts the backup view into the
//! status document. Called from the MicroK8s poll (every few seconds) and when a run ends.

use std::sync::Arc;
use std::time::Instant;

use rackseed_config::Role;
use rackseed_formation::Phase;

use super::{Runtime, TaskResult};
use crate::backup::{self, ArchiveStore, BackupJob, CopyTarget, Schedule};

/// What the driver keeps for backups.
#[derive(Default)]
pub(super) struct BackupDuty {
    store: Option<ArchiveStore>,
    schedule: Schedule,
}

impl Runtime {
    /// See the module docs.
    pub(super) fn backup_tick(&mut self) {
        let st = self.node.status();
        if !matches!(
            st.phase,
            Phase::Member {
                role: Role::ControlPlane,
                ..
            }
        ) {
            self.doc.backup = None;
            return;
        }
        let Some(datastore) = self.agent.microk8s.datastore() else {
            return;
        };
        let cfg = &self.agent.config;
        if self.backup.store.is_none() {
            let dir = self.agent.state_dir.join("backups");
            match ArchiveStore::open(&dir, cfg.backup.keep, &cfg.cluster.name) {
                Ok(s) => {
                    self.coordinator.set_backup_store(Arc::new(s.clone()));
                    self.coordinator
                        .set_restore_handler(backup::restore_handler(
                            datastore.clone(),
                            self.agent.state_dir.clone(),
                            self.agent.node_id.to_string(),
                            cfg.cluster.name.clone(),
                        ));
                    self.backup.store = Some(s);
                }
                Err(e) => {
                    self.doc.backup = Some(rackseed_protocol::status::BackupView {
                        alarm: Some(format!("backups cannot be kept: {e:#}")),
                        ..Default::default()
                    });
                    return;
                }
            }
        }
        let Some(store) = self.backup.store.clone() else {
            return;
        };
        // The chosen record names this node authority, and no newer record it heard of names
        // another (see `crate::backup`).
        let scheduler = st.is_authority && st.authority.as_ref() == Some(&st.me);
        let interval = cfg.backup.interval;
        let sched = &self.backup.schedule;
        if scheduler && !sched.running {
            let newest = store.newest().ok().flatten();
            let since = sched.last_attempt.map(|t| t.elapsed());
            if backup::is_due(
                newest.as_ref(),
                backup::now_unix(),
                interval,
                since,
                sched.last_error.is_some(),
            ) {
                self.spawn_backup(datastore, store.clone());
            }
        }
        self.doc.backup = Some(self.backup.schedule.view(
            &store,
            self.agent.node_id.as_str(),
            scheduler,
            interval,
        ));
    }

    fn spawn_backup(
        &mut self,
        datastore: Arc<dyn crate::system::microk8s::dbctl::Datastore>,
        store: ArchiveStore,
    ) {
        let me = self.agent.node_id.clone();
        let targets: Vec<CopyTarget> = self
            .node
            .persisted()
            .chosen
            .as_ref()
            .map(|a| {
                a.record
                    .control_plane_members()
                    .filter(|id| **id != me)
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .filter_map(|id| {
                let peer = self.discovery.peer(id.as_str())?;
                let ip = peer.preferred_addr()?;
                Some(CopyTarget {
                    node: id.to_string(),
                    addr: std::net::SocketAddr::new(ip, peer.port),
                    fingerprint: peer.fingerprint.clone(),
                })
            })
            .collect();
        let job = BackupJob {
            datastore,
            store,
            keyring: self.agent.keyring.clone(),
            client: self.client.clone(),
            node_id: me.to_string(),
            cluster_name: self.agent.config.cluster.name.clone(),
            cluster_id: self
                .node
                .status()
                .cluster
                .map(|c| c.to_string())
                .unwrap_or_default(),
            targets,
        };
        self.backup.schedule.running = true;
        self.backup.schedule.last_attempt = Some(Instant::now());
        self.timeline("taking a datastore backup".to_string());
        let tasks = self.tasks.clone();
        tokio::spawn(async move {
            let outcome = job.run().await;
            let _ = tasks.send(TaskResult::Backup(Box::new(outcome))).await;
        });
    }

    /// A backup run ended.
    pub(super) fn backup_finished(&mut self, outcome: backup::Outcome) {
        match (&outcome.error, &outcome.manifest) {
            (Some(e), _) => {
                tracing::warn!(error = %e, "datastore backup failed");
                self.timeline(format!("datastore backup failed: {e}"));
            }
            (None, Some(m)) if m.suspect.is_some() => {
                self.timeline(format!(
                    "datastore backup {} is suspect: {}",
                    m.name,
                    m.suspect.as_deref().unwrap_or_default()
                ));
            }
            (None, Some(m)) => self.timeline(format!(
                "datastore backup {} kept on {} node(s)",
                m.name,
                outcome.copies.len()
            )),
            (None, None) => {}
        }
        self.backup.schedule.finished(outcome);
        self.backup_tick();
    }
}
