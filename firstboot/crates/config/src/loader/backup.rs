//! `[backup]`: how often one control-plane node takes MicroK8s' datastore backup
//! (`interval`) and how many archives every control-plane node keeps (`keep`).

use crate::diagnostic::Report;
use crate::model::*;
use crate::tree::{Node, TableReader};
use crate::values;

pub(super) fn read_backup(rep: &mut Report<'_>, node: &Node) -> Option<Backup> {
    let mut t = TableReader::open(rep, node, "backup")?;
    let interval = match t.str(rep, "interval") {
        Some((s, span)) => match values::parse_duration(s) {
            Ok(d) if (MIN_BACKUP_INTERVAL..=MAX_BACKUP_INTERVAL).contains(&d) => Some(d),
            Ok(d) => {
                rep.error(
                    span,
                    "backup.interval",
                    format!(
                        "expected a duration from 5s to 30 days, like \"6h\", got {}s",
                        d.as_secs()
                    ),
                );
                None
            }
            Err(m) => {
                rep.error(span, "backup.interval", m);
                None
            }
        },
        None if t.has("interval") => None,
        None => Some(DEFAULT_BACKUP_INTERVAL),
    };
    let keep = match t.int(rep, "keep", 1, 1000) {
        Some((n, _)) => Some(n as u32),
        None if t.has("keep") => None,
        None => Some(DEFAULT_BACKUP_KEEP),
    };
    t.finish(rep);
    Some(Backup {
        interval: interval?,
        keep: keep?,
    })
}
