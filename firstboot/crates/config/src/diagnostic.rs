//! Diagnostics (`file:line:col: field: message`) and the error type the loader returns.
//!
//! A [`Diagnostic`] points at one place in one file; [`ConfigError`] carries every error found
//! in a file so the user fixes them all in one go. Line and column are 1-based, the column
//! counted in characters. A diagnostic about the whole file (it cannot be read) has line 0.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One finding in a config file: an error or a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based line; 0 when the finding is about the whole file (e.g. it cannot be read).
    pub line: usize,
    /// 1-based column in characters; 0 with `line == 0`.
    pub col: usize,
    /// Field path such as `addons.metallb.addresses[1]`; empty for the whole file.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.col)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every error found in one config file (never empty), or the one diagnostic saying it could
/// not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigError {
    /// The error for a file that cannot be read.
    pub fn io(file: &Path, err: &std::io::Error) -> Self {
        ConfigError {
            diagnostics: vec![Diagnostic {
                file: file.to_path_buf(),
                line: 0,
                col: 0,
                field: String::new(),
                message: format!("cannot read config file: {err}"),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Turns byte offsets into 1-based line and character column.
pub(crate) struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, starts }
    }

    pub(crate) fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        let col = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        (line, col)
    }
}

/// Collects errors and warnings while the loader walks a file.
pub(crate) struct Report<'a> {
    file: &'a Path,
    lines: LineIndex<'a>,
    pub(crate) errors: Vec<Diagnostic>,
    pub(crate) warnings: Vec<Diagnostic>,
}

impl<'a> Report<'a> {
    pub(crate) fn new(file: &'a Path, text: &'a str) -> Self {
        Report {
            file,
            lines: LineIndex::new(text),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn make(&self, span: &Range<usize>, field: &str, message: String) -> Diagnostic {
        let (line, col) = self.lines.line_col(span.start);
        Diagnostic {
            file: self.file.to_path_buf(),
            line,
            col,
            field: field.to_string(),
            message,
        }
    }

    pub(crate) fn error(&mut self, span: &Range<usize>, field: &str, message: impl Into<String>) {
        let d = self.make(span, field, message.into());
        self.errors.push(d);
    }

    pub(crate) fn warn(&mut self, span: &Range<usize>, field: &str, message: impl Into<String>) {
        let d = self.make(span, field, message.into());
        self.warnings.push(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column() {
        let idx = LineIndex::new("ab\ncdé\n\nx");
        assert_eq!(idx.line_col(0), (1, 1));
        assert_eq!(idx.line_col(1), (1, 2));
        assert_eq!(idx.line_col(3), (2, 1));
        assert_eq!(idx.line_col(7), (2, 4)); // after the two-byte é
        assert_eq!(idx.line_col(8), (3, 1));
        assert_eq!(idx.line_col(9), (4, 1));
        assert_eq!(idx.line_col(99), (4, 2));
    }

    #[test]
    fn display() {
        let d = Diagnostic {
            file: "c.toml".into(),
            line: 3,
            col: 5,
            field: "cluster.name".into(),
            message: "expected a string".into(),
        };
        assert_eq!(d.to_string(), "c.toml:3:5: cluster.name: expected a string");
        let e = ConfigError::io(
            Path::new("x.toml"),
            &std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert!(e
            .to_string()
            .starts_with("x.toml: cannot read config file: "));
    }
}
