//! Reads a `.bmap` (bmaptool's XML format, version 2.x, SHA-256 checksums) into a [`Bmap`]
//! whose every number has been checked: the block count matches the image size, each range
//! lies inside the image, ranges ascend without overlapping, and every byte offset the
//! flasher will compute was computed here with checked arithmetic. A file that fails any of
//! these gives an error starting with `bmap:` and naming the value, never a panic or a wrapped
//! number. [`Bmap::parse_bytes`] is what `flash` calls; the property tests below feed it
//! arbitrary bytes. To accept another field, check it where [`Bmap::parse_bytes`] reads the
//! header (`Bmap::from_header`), so nothing downstream does arithmetic on an unchecked value.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};

/// One mapped range of blocks, inclusive, with the SHA-256 of its bytes and its byte span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmapRange {
    pub first: u64,
    pub last: u64,
    /// Lowercase hex, 64 digits.
    pub sha256: String,
    /// First byte of the range in the image.
    pub start: u64,
    /// One past its last byte, clipped to the image size (the last block may be partial).
    pub end: u64,
}

/// A parsed and checked `.bmap` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    pub blocks_count: u64,
    pub ranges: Vec<BmapRange>,
    mapped_bytes: u64,
}

/// Block sizes above this are refused: bmaptool writes 4096, and a huge one only serves to
/// make offsets overflow.
const MAX_BLOCK_SIZE: u64 = 1 << 30;

fn number(field: &str, text: &str) -> Result<u64> {
    let t = text.trim();
    ensure!(
        !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()),
        "bmap: {field} {t:?} is not a whole number"
    );
    t.parse()
        .with_context(|| format!("bmap: {field} {t} does not fit in 64 bits"))
}

/// What the XML walk collects from a `.bmap` file, before any number is checked.
#[derive(Default)]
struct RawBmap {
    /// Element path from the root to the element being read.
    path: Vec<String>,
    /// Text of every element other than `<Range>`, by element name.
    fields: BTreeMap<String, String>,
    /// (first, last, chksum) in file order.
    ranges: Vec<(u64, u64, String)>,
    /// The open `<Range>`'s chksum, and whether its block numbers were seen.
    open_range: Option<(String, bool)>,
    /// Whether `<bmap version="2.x">` was seen.
    version_ok: bool,
}

impl RawBmap {
    /// Walks the XML of a `.bmap` file's bytes into fields and unchecked ranges.
    fn read(bytes: &[u8]) -> Result<RawBmap> {
        use quick_xml::events::Event;
        let xml = std::str::from_utf8(bytes).context("bmap: not UTF-8 text")?;
        let mut reader = quick_xml::Reader::from_str(xml);
        let mut raw = RawBmap::default();
        loop {
            match reader.read_event().context("bmap: malformed XML")? {
                Event::Start(e) => raw.start(&e)?,
                Event::Empty(e) => {
                    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                    ensure!(name != "Range", "bmap: an empty <Range/> maps no blocks");
                    ensure!(name != "bmap", "bmap: an empty <bmap/> holds no block map");
                }
                Event::End(_) => raw.end()?,
                Event::Text(t) => {
                    let text = t.decode().context("bmap: text")?.trim().to_owned();
                    if !text.is_empty() {
                        raw.text(text)?;
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        Ok(raw)
    }

    /// Opens an element: checks the `<bmap>` version and opens a `<Range>` with its chksum.
    fn start(&mut self, e: &quick_xml::events::BytesStart<'_>) -> Result<()> {
        let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
        ensure!(self.open_range.is_none(), "bmap: <{name}> inside a <Range>");
        let mut sum = None;
        for a in e.attributes() {
            let a = a.context("bmap: malformed attribute")?;
            let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
            let val = a.unescape_value().context("bmap: attribute")?.into_owned();
            if name == "bmap" && key == "version" {
                ensure!(
                    val.starts_with("2."),
                    "bmap: version {val} is not supported (2.x expected)"
                );
                self.version_ok = true;
            }
            if name == "Range" && key == "chksum" {
                sum = Some(val);
            }
        }
        if name == "Range" {
            let sum = sum.context("bmap: a Range has no chksum attribute")?;
            self.open_range = Some((sum, false));
        }
        self.path.push(name);
        Ok(())
    }

    /// Closes an element; a closed `<Range>` must have held its block numbers.
    fn end(&mut self) -> Result<()> {
        let closed = self.path.pop();
        if closed.as_deref() == Some("Range") {
            let (_, seen) = self.open_range.take().context("bmap: unbalanced Range")?;
            ensure!(seen, "bmap: a <Range> has no block numbers");
        }
        Ok(())
    }

    /// Takes an element's non-empty text: a `<Range>`'s block numbers or a field's value.
    fn text(&mut self, text: String) -> Result<()> {
        match self.path.last().map(String::as_str) {
            Some("Range") => {
                let (sum, seen) = self
                    .open_range
                    .as_mut()
                    .context("bmap: text outside a Range")?;
                ensure!(!*seen, "bmap: a <Range> holds two block numbers");
                *seen = true;
                let (a, b) = text.split_once('-').unwrap_or((&text, &text));
                let first = number("Range start", a)?;
                let last = number("Range end", b)?;
                ensure!(first <= last, "bmap: Range {text} is reversed");
                self.ranges.push((first, last, std::mem::take(sum)));
            }
            Some(name) => {
                if let Some(old) = self.fields.insert(name.to_owned(), text) {
                    bail!("bmap: <{name}> is given twice (first {old:?})");
                }
            }
            None => {}
        }
        Ok(())
    }

    /// The whole number in field `<k>`, or an error naming the missing or bad field.
    fn number_field(&self, k: &str) -> Result<u64> {
        number(
            &format!("<{k}>"),
            self.fields
                .get(k)
                .with_context(|| format!("bmap: missing <{k}>"))?,
        )
    }
}

impl Bmap {
    /// Parses bmaptool's XML format from text.
    pub fn parse(xml: &str) -> Result<Bmap> {
        Bmap::parse_bytes(xml.as_bytes())
    }

    /// Parses and checks a `.bmap` file's bytes.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Bmap> {
        let mut raw = RawBmap::read(bytes)?;
        let mut bmap = Bmap::from_header(&raw)?;
        bmap.push_ranges(std::mem::take(&mut raw.ranges))?;
        Ok(bmap)
    }

    /// A [`Bmap`] with no ranges yet, from the checked header fields (version, checksum type,
    /// image size, block size and block count).
    fn from_header(raw: &RawBmap) -> Result<Bmap> {
        ensure!(raw.version_ok, "bmap: missing <bmap version=\"2.x\">");
        let checksum_type = raw.fields.get("ChecksumType").map(String::as_str);
        ensure!(
            checksum_type == Some("sha256"),
            "bmap: checksum type {checksum_type:?} is not supported (sha256 expected)"
        );
        let image_size = raw.number_field("ImageSize")?;
        let block_size = raw.number_field("BlockSize")?;
        let blocks_count = raw.number_field("BlocksCount")?;
        ensure!(block_size > 0, "bmap: BlockSize is 0");
        ensure!(
            block_size <= MAX_BLOCK_SIZE,
            "bmap: BlockSize {block_size} is larger than {MAX_BLOCK_SIZE}"
        );
        let expected_blocks = image_size.div_ceil(block_size);
        ensure!(
            blocks_count == expected_blocks,
            "bmap: BlocksCount {blocks_count} does not match ImageSize {image_size} / BlockSize \
             {block_size} ({expected_blocks} blocks)"
        );
        Ok(Bmap {
            image_size,
            block_size,
            blocks_count,
            ranges: Vec::new(),
            mapped_bytes: 0,
        })
    }

    /// Checks the ranges (in file order) against the header and each other, and adds them
    /// with their byte spans.
    fn push_ranges(&mut self, raw_ranges: Vec<(u64, u64, String)>) -> Result<()> {
        let (image_size, block_size, blocks_count) =
            (self.image_size, self.block_size, self.blocks_count);
        self.ranges.reserve(raw_ranges.len());
        let mut prev_last: Option<u64> = None;
        for (first, last, sum) in raw_ranges {
            ensure!(
                last < blocks_count,
                "bmap: range {first}-{last} beyond BlocksCount {blocks_count}"
            );
            ensure!(
                prev_last.is_none_or(|p| first > p),
                "bmap: ranges overlap or are out of order at {first}"
            );
            prev_last = Some(last);
            let start = first
                .checked_mul(block_size)
                .with_context(|| format!("bmap: range {first}-{last} starts beyond 2^64 bytes"))?;
            ensure!(
                start < image_size,
                "bmap: range {first}-{last} starts at byte {start}, past ImageSize {image_size}"
            );
            // (last + 1) * block_size may pass 2^64 only when it is past the image's end,
            // which the clip to image_size removes anyway.
            let end = last
                .checked_add(1)
                .and_then(|n| n.checked_mul(block_size))
                .map_or(image_size, |e| e.min(image_size));
            self.mapped_bytes = self
                .mapped_bytes
                .checked_add(end - start)
                .context("bmap: mapped bytes overflow")?;
            ensure!(
                sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()),
                "bmap: range {first}-{last}: chksum {sum:?} is not a SHA-256 (64 hex digits)"
            );
            self.ranges.push(BmapRange {
                first,
                last,
                sha256: sum.to_ascii_lowercase(),
                start,
                end,
            });
        }
        Ok(())
    }

    /// Bytes the ranges cover (at most the image size).
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(image_size: &str, block: &str, count: &str, ranges: &[(&str, &str)]) -> String {
        let mut x = format!(
            "<?xml version=\"1.0\" ?>\n<bmap version=\"2.0\">\n<ImageSize> {image_size} </ImageSize>\n\
             <BlockSize> {block} </BlockSize>\n<BlocksCount> {count} </BlocksCount>\n\
             <ChecksumType> sha256 </ChecksumType>\n<BlockMap>\n"
        );
        for (sum, text) in ranges {
            x.push_str(&format!("<Range chksum=\"{sum}\"> {text} </Range>\n"));
        }
        x.push_str("</BlockMap>\n</bmap>\n");
        x
    }

    fn aa() -> String {
        "aa".repeat(32)
    }

    pub(crate) fn sample_text() -> String {
        sample(
            "10000",
            "4096",
            "3",
            &[(&aa(), "0"), (&"BB".repeat(32), "2-2")],
        )
    }

    #[test]
    fn parses_bmaptool_format_and_clips_the_last_block() {
        let b = Bmap::parse(&sample_text()).unwrap();
        assert_eq!(b.image_size, 10000);
        assert_eq!(b.ranges.len(), 2);
        assert_eq!((b.ranges[1].start, b.ranges[1].end), (8192, 10000));
        assert_eq!(b.ranges[1].sha256, "bb".repeat(32));
        assert_eq!(b.mapped_bytes(), 4096 + 1808);
    }

    #[test]
    fn rejects_bad_bmaps_with_reasons() {
        let cases: Vec<(String, &str)> = vec![
            (
                sample_text().replace("version=\"2.0\"", "version=\"1.4\""),
                "not supported",
            ),
            (sample_text().replace("2-2", "2-9"), "beyond BlocksCount"),
            (
                sample("10000", "4096", "3", &[(&aa(), "1"), (&aa(), "0")]),
                "out of order",
            ),
            // ImageSize below a range start: once an unchecked subtraction.
            (
                sample("100", "4096", "3", &[(&aa(), "2")]),
                "does not match ImageSize",
            ),
            (sample("10000", "0", "3", &[]), "BlockSize is 0"),
            (sample("10000", "4096", "3", &[(&aa(), "2-1")]), "reversed"),
            (
                sample("10000", "4096", "3", &[(&aa(), "-1")]),
                "not a whole number",
            ),
            (
                sample("10000", "4096", "3", &[(&aa(), "99999999999999999999")]),
                "64 bits",
            ),
            (
                sample("10000", "4096", "3", &[("zz", "0")]),
                "not a SHA-256",
            ),
            (
                sample("10000", "4096", "3", &[(&aa(), "")]),
                "no block numbers",
            ),
            (
                sample_text().replace("<BlockMap>", "<BlockSize>1</BlockSize><BlockMap>"),
                "twice",
            ),
            (sample_text().replace("sha256", "md5"), "not supported"),
            ("<bmap".into(), "bmap:"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", Bmap::parse(&text).unwrap_err());
            assert!(e.starts_with("bmap:"), "{e}");
            assert!(e.contains(want), "want {want:?}, got {e}\n{text}");
        }
        // The largest image: the end of its last block is past 2^64 and is clipped, not wrapped.
        let b = Bmap::parse(&sample(
            "18446744073709551615",
            "1073741824",
            "17179869184",
            &[(&aa(), "17179869183")],
        ))
        .unwrap();
        assert_eq!(b.ranges[0].end, u64::MAX);
        assert_eq!(b.mapped_bytes(), u64::MAX - b.ranges[0].start);
        let e = Bmap::parse_bytes(b"<bmap version=\"2.0\">\xff</bmap>").unwrap_err();
        assert!(e.to_string().contains("UTF-8"), "{e}");
    }

    fn check_invariants(b: &Bmap) {
        let mut prev_end = 0;
        let mut total = 0u64;
        for r in &b.ranges {
            assert!(r.first <= r.last && r.last < b.blocks_count);
            assert!(r.start >= prev_end && r.start < r.end && r.end <= b.image_size);
            prev_end = r.end;
            total += r.end - r.start;
        }
        assert_eq!(total, b.mapped_bytes());
        assert!(b.mapped_bytes() <= b.image_size);
    }

    fn outcome(bytes: &[u8]) {
        match Bmap::parse_bytes(bytes) {
            Ok(b) => check_invariants(&b),
            Err(e) => assert!(
                format!("{e:#}").starts_with("bmap:"),
                "unclear error: {e:#}"
            ),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any bytes at all: no panic, and an error says it is about the bmap.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            outcome(&bytes);
        }

        /// A valid file with bytes overwritten, inserted or cut anywhere.
        #[test]
        fn mutated_bmaps_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8)
        ) {
            let mut bytes = sample_text().into_bytes();
            for (at, byte, how) in edits {
                let i = at.index(bytes.len() + 1);
                match how {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ if i < bytes.len() => { bytes.remove(i); }
                    _ => {}
                }
            }
            outcome(&bytes);
        }

        /// Well-formed files with extreme numbers: every offset is checked, none wraps.
        #[test]
        fn extreme_numbers_are_checked(
            size in prop_oneof![any::<u64>(), 0u64..100_000, Just(u64::MAX)],
            block in prop_oneof![any::<u64>(), 1u64..8192, Just(4096u64), Just(0u64)],
            count in prop_oneof![any::<u64>(), 0u64..64],
            ranges in proptest::collection::vec(
                (prop_oneof![any::<u64>(), 0u64..64], prop_oneof![any::<u64>(), 0u64..64]), 0..6),
        ) {
            let texts: Vec<String> = ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect();
            let sum = aa();
            let pairs: Vec<(&str, &str)> = texts.iter().map(|t| (sum.as_str(), t.as_str())).collect();
            outcome(sample(&size.to_string(), &block.to_string(), &count.to_string(), &pairs).as_bytes());
            // The same with a consistent block count, so the range checks are reached.
            if block > 0 {
                let count = size.div_ceil(block).to_string();
                outcome(sample(&size.to_string(), &block.to_string(), &count, &pairs).as_bytes());
            }
        }
    }
}
