//! A small spanned tree built from a parsed TOML document, and readers that walk it while
//! collecting errors instead of stopping at the first.
//!
//! `toml_edit` gives spans but several node types (tables, inline tables, arrays of tables);
//! [`Node`] flattens them into one shape so the loader reads every section the same way. A
//! [`TableReader`] remembers which keys the loader asked for and reports every other key as
//! unknown (with a kebab-case or spelling hint). To read a new kind of value, add a method on
//! [`TableReader`] or a helper taking a [`Node`].

use std::ops::Range;

use toml_edit::{Item, TableLike, Value};

use super::diagnostic::Report;

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub span: Range<usize>,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Str(String),
    Int(i64),
    Float,
    Bool(bool),
    Datetime,
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub key_span: Range<usize>,
    pub value: Node,
}

impl Node {
    pub(crate) fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Str(_) => "a string",
            Kind::Int(_) => "an integer",
            Kind::Float => "a float",
            Kind::Bool(_) => "a boolean",
            Kind::Datetime => "a date-time",
            Kind::Array(_) => "an array",
            Kind::Table(_) => "a table",
        }
    }

    /// Builds the tree of a whole document.
    pub(crate) fn from_document(doc: &toml_edit::Document<&str>) -> Node {
        let len = doc.raw().len();
        from_table_like(doc.as_table(), 0..len.min(1))
    }
}

fn from_item(item: &Item, fallback: &Range<usize>) -> Node {
    let span = item.span().unwrap_or_else(|| fallback.clone());
    match item {
        Item::Value(v) => from_value(v, fallback),
        Item::Table(t) => from_table_like(t, span),
        Item::ArrayOfTables(a) => Node {
            span: span.clone(),
            kind: Kind::Array(
                a.iter()
                    .map(|t| {
                        let s = t.span().unwrap_or_else(|| span.clone());
                        from_table_like(t, s)
                    })
                    .collect(),
            ),
        },
        Item::None => Node {
            span,
            kind: Kind::Table(Vec::new()),
        },
    }
}

fn from_value(v: &Value, fallback: &Range<usize>) -> Node {
    let span = v.span().unwrap_or_else(|| fallback.clone());
    let kind = match v {
        Value::String(s) => Kind::Str(s.value().clone()),
        Value::Integer(i) => Kind::Int(*i.value()),
        Value::Float(_) => Kind::Float,
        Value::Boolean(b) => Kind::Bool(*b.value()),
        Value::Datetime(_) => Kind::Datetime,
        Value::Array(a) => Kind::Array(a.iter().map(|x| from_value(x, &span)).collect()),
        Value::InlineTable(t) => return from_table_like(t, span),
    };
    Node { span, kind }
}

fn from_table_like(t: &dyn TableLike, span: Range<usize>) -> Node {
    let mut entries = Vec::new();
    for (k, item) in t.iter() {
        let key_span = t
            .key(k)
            .and_then(|key| key.span())
            .unwrap_or_else(|| span.clone());
        let value = from_item(item, &key_span);
        entries.push(Entry {
            key: k.to_string(),
            key_span,
            value,
        });
    }
    Node {
        span,
        kind: Kind::Table(entries),
    }
}

/// Reads the keys of one table; reports unknown keys on [`TableReader::finish`].
pub(crate) struct TableReader<'n> {
    pub path: String,
    pub span: Range<usize>,
    entries: &'n [Entry],
    used: Vec<bool>,
    known: Vec<&'static str>,
}

/// Joins a parent field path and a key.
pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'n> TableReader<'n> {
    /// Opens `node` as a table; reports an error and returns `None` if it is not one.
    pub(crate) fn open(rep: &mut Report<'_>, node: &'n Node, path: &str) -> Option<Self> {
        match &node.kind {
            Kind::Table(entries) => Some(TableReader {
                path: path.to_string(),
                span: node.span.clone(),
                entries,
                used: vec![false; entries.len()],
                known: Vec::new(),
            }),
            _ => {
                rep.error(
                    &node.span,
                    path,
                    format!("expected a table, found {}", node.type_name()),
                );
                None
            }
        }
    }

    /// The field path of `key` in this table.
    pub(crate) fn field(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Takes the value of `key`, marking it known and used.
    pub(crate) fn get(&mut self, key: &'static str) -> Option<&'n Entry> {
        if !self.known.contains(&key) {
            self.known.push(key);
        }
        let i = self.entries.iter().position(|e| e.key == key)?;
        self.used[i] = true;
        Some(&self.entries[i])
    }

    /// Whether the table has `key` (without taking it).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|e| e.key == key)
    }

    /// Reports a required key that is missing.
    pub(crate) fn missing(&self, rep: &mut Report<'_>, key: &str, expected: &str) {
        rep.error(
            &self.span,
            &self.field(key),
            format!("missing required key; expected {expected}"),
        );
    }

    /// Reads a string; reports a type error and returns `None` on anything else.
    pub(crate) fn str(
        &mut self,
        rep: &mut Report<'_>,
        key: &'static str,
    ) -> Option<(&'n str, &'n Range<usize>)> {
        let e = self.get(key)?;
        let f = self.field(key);
        node_str(rep, &e.value, &f).map(|s| (s, &e.value.span))
    }

    /// Reads a boolean.
    pub(crate) fn bool(&mut self, rep: &mut Report<'_>, key: &'static str) -> Option<bool> {
        let e = self.get(key)?;
        match e.value.kind {
            Kind::Bool(b) => Some(b),
            _ => {
                rep.error(
                    &e.value.span,
                    &self.field(key),
                    format!("expected true or false, found {}", e.value.type_name()),
                );
                None
            }
        }
    }

    /// Reads an integer in `lo..=hi`.
    pub(crate) fn int(
        &mut self,
        rep: &mut Report<'_>,
        key: &'static str,
        lo: i64,
        hi: i64,
    ) -> Option<(i64, &'n Range<usize>)> {
        let e = self.get(key)?;
        match e.value.kind {
            Kind::Int(i) if (lo..=hi).contains(&i) => Some((i, &e.value.span)),
            Kind::Int(i) => {
                rep.error(
                    &e.value.span,
                    &self.field(key),
                    format!("expected an integer from {lo} to {hi}, got {i}"),
                );
                None
            }
            _ => {
                rep.error(
                    &e.value.span,
                    &self.field(key),
                    format!("expected an integer, found {}", e.value.type_name()),
                );
                None
            }
        }
    }

    /// Reads a string and converts it with `parse`, reporting its message on failure.
    pub(crate) fn parsed<T>(
        &mut self,
        rep: &mut Report<'_>,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let (s, span) = self.str(rep, key)?;
        match parse(s) {
            Ok(v) => Some(v),
            Err(m) => {
                rep.error(span, &self.field(key), m);
                None
            }
        }
    }

    /// Reads an array of strings, each converted with `parse`; bad items are reported one by
    /// one (`key[i]`) and left out. Returns the good items with their spans.
    pub(crate) fn list<T>(
        &mut self,
        rep: &mut Report<'_>,
        key: &'static str,
        mut parse: impl FnMut(&str) -> Result<T, String>,
    ) -> Option<Vec<(T, Range<usize>)>> {
        let e = self.get(key)?;
        let f = self.field(key);
        let Kind::Array(items) = &e.value.kind else {
            rep.error(
                &e.value.span,
                &f,
                format!(
                    "expected an array of strings, found {}",
                    e.value.type_name()
                ),
            );
            return None;
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let fi = format!("{f}[{i}]");
            if let Some(s) = node_str(rep, item, &fi) {
                match parse(s) {
                    Ok(v) => out.push((v, item.span.clone())),
                    Err(m) => rep.error(&item.span, &fi, m),
                }
            }
        }
        Some(out)
    }

    /// Reports every key that was never asked for.
    pub(crate) fn finish(self, rep: &mut Report<'_>) {
        for (e, used) in self.entries.iter().zip(&self.used) {
            if *used {
                continue;
            }
            let mut msg = "unknown key".to_string();
            let kebab = e.key.replace('_', "-");
            if kebab != e.key && self.known.contains(&kebab.as_str()) {
                msg.push_str(&format!("; keys are kebab-case: did you mean `{kebab}`?"));
            } else if let Some(best) = closest(&e.key, &self.known) {
                msg.push_str(&format!("; did you mean `{best}`?"));
            } else if !self.known.is_empty() {
                msg.push_str(&format!("; expected one of: {}", self.known.join(", ")));
            }
            rep.error(&e.key_span, &join(&self.path, &e.key), msg);
        }
    }
}

/// Reads a node as a string.
pub(crate) fn node_str<'n>(rep: &mut Report<'_>, node: &'n Node, field: &str) -> Option<&'n str> {
    match &node.kind {
        Kind::Str(s) => Some(s),
        _ => {
            rep.error(
                &node.span,
                field,
                format!("expected a string, found {}", node.type_name()),
            );
            None
        }
    }
}

fn closest(key: &str, known: &[&'static str]) -> Option<&'static str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance() {
        assert_eq!(edit_distance("chanel", "channel"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            closest("chanel", &["channel", "offline-snaps"]),
            Some("channel")
        );
        assert_eq!(closest("zzzzzz", &["channel"]), None);
    }
}
