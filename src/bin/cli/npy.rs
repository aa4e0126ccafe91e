//! Reading `.npy` inputs: [`read_npy`] is the one function through which the CLI opens every
//! input file.
//!
//! The header (a Python dict literal) is read by a small strict parser of the subset that plain
//! arrays use (`{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 5), }`), behind two
//! hard limits that no such header comes near: [`MAX_HEADER_BYTES`] and [`MAX_NESTING`]. So a
//! hostile header is refused in time linear in at most 10 kB, and no general Python-literal parser
//! ever sees one. The data section is checked against the file's size before anything is
//! allocated, and allocated fallibly.

use fused_weighted_loss::f16;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// The largest header accepted, in bytes (numpy's own loader refuses larger ones by default; a
/// plain array's header is about 120 bytes).
pub const MAX_HEADER_BYTES: usize = 10_000;

/// The deepest bracket nesting accepted in a header: the dict and the shape tuple.
pub const MAX_NESTING: usize = 2;

/// The element types the CLI reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// `f4`
    F32,
    /// `f2`
    F16,
    /// `i8`
    I64,
    /// `i4`
    I32,
}

impl Elem {
    fn name(self) -> &'static str {
        match self {
            Elem::F32 => "float32",
            Elem::F16 => "float16",
            Elem::I64 => "int64",
            Elem::I32 => "int32",
        }
    }

    fn size(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::F16 => 2,
            Elem::I64 => 8,
        }
    }
}

/// An array read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Npy {
    /// The shape as stored.
    pub dims: Vec<usize>,
    /// The elements in C order.
    pub data: NpyData,
}

/// The elements of an [`Npy`], by type.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// float32
    F32(Vec<f32>),
    /// float16
    F16(Vec<f16>),
    /// int64
    I64(Vec<i64>),
    /// int32
    I32(Vec<i32>),
}

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// The operating system refused to open or read it.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A directory, a device, a pipe...
    #[error("not a regular file")]
    NotAFile,
    /// The file does not start with the `.npy` magic.
    #[error("not a .npy file (no \\x93NUMPY magic at the start)")]
    Magic,
    /// A format version other than 1.0, 2.0, 3.0.
    #[error("not a .npy file this tool reads (format version {0}.{1})")]
    Version(u8, u8),
    /// The header is longer than [`MAX_HEADER_BYTES`].
    #[error("header of {len} bytes is longer than the {max} bytes allowed")]
    HeaderTooLarge {
        /// What the file says.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The header nests brackets deeper than [`MAX_NESTING`].
    #[error(
        "header nests brackets more than {max} deep, as no plain array's does (structured dtypes are not supported)"
    )]
    HeaderNesting {
        /// The limit.
        max: usize,
    },
    /// The header is not the dict literal of a plain array.
    #[error("malformed header at byte {at}: {what}")]
    HeaderSyntax {
        /// Offset in the header text.
        at: usize,
        /// What was expected.
        what: &'static str,
    },
    /// A required key is missing.
    #[error("header has no '{0}'")]
    MissingKey(&'static str),
    /// A key other than `descr`, `fortran_order`, `shape`, or one of them twice.
    #[error("header has an unexpected or repeated key {0:?}")]
    BadKey(String),
    /// An element type the caller did not ask for.
    #[error("dtype {found} is not {expected}")]
    Dtype {
        /// The `descr` of the file.
        found: String,
        /// The types accepted, in words.
        expected: String,
    },
    /// Column-major data.
    #[error("Fortran-order arrays are not supported")]
    FortranOrder,
    /// The shape's element or byte count overflows.
    #[error("shape {0:?} is too large")]
    ShapeOverflow(Vec<u64>),
    /// The data section is shorter or longer than the header says.
    #[error("the header describes {expected} bytes of data, the file holds {got}")]
    DataSize {
        /// Bytes the header implies.
        expected: u64,
        /// Bytes after the header.
        got: u64,
    },
    /// The data cannot be held in memory.
    #[error("no memory for {0} bytes of data")]
    OutOfMemory(u64),
}

/// What the header says.
#[derive(Debug, Clone, PartialEq)]
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<u64>,
}

/// Reads the array in `path`, which must be one of the `accept`ed element types.
///
/// Refuses, with a typed error and without reading the data, anything that is not a regular file,
/// a header past the limits or outside the plain-array subset, Fortran order, another dtype, and a
/// data section whose size disagrees with the shape.
pub fn read_npy(path: &Path, accept: &[Elem]) -> Result<Npy, NpyError> {
    let (mut r, info, big_endian) = open_npy(path, accept)?;
    let n = info.len();
    let data = match info.elem {
        Elem::F32 => NpyData::F32(read_body(&mut r, n, big_endian, f32::from_le_bytes, f32::from_be_bytes)?),
        Elem::F16 => NpyData::F16(read_body(&mut r, n, big_endian, f16::from_le_bytes, f16::from_be_bytes)?),
        Elem::I64 => NpyData::I64(read_body(&mut r, n, big_endian, i64::from_le_bytes, i64::from_be_bytes)?),
        Elem::I32 => NpyData::I32(read_body(&mut r, n, big_endian, i32::from_le_bytes, i32::from_be_bytes)?),
    };
    Ok(Npy { dims: info.dims, data })
}

/// What a file holds, from its header: the shape and element type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyInfo {
    /// The shape as stored.
    pub dims: Vec<usize>,
    /// The element type.
    pub elem: Elem,
}

impl NpyInfo {
    /// Elements (the shape's product, checked when the header was read).
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Bytes of the elements in memory.
    pub fn bytes(&self) -> u64 {
        self.len() as u64 * self.elem.size() as u64
    }
}

/// The header of `path`, with every check of [`read_npy`] but no data read: what a caller needs
/// to check shapes and memory before reading.
pub fn peek_npy(path: &Path, accept: &[Elem]) -> Result<NpyInfo, NpyError> {
    open_npy(path, accept).map(|(_, info, _)| info)
}

/// Opens `path`, reads and checks its header: the reader at the data, what it holds, and
/// whether the data is big-endian.
fn open_npy(path: &Path, accept: &[Elem]) -> Result<(BufReader<File>, NpyInfo, bool), NpyError> {
    // a FIFO or a device would block or never end: look before opening
    if !std::fs::metadata(path)?.is_file() {
        return Err(NpyError::NotAFile);
    }
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(NpyError::NotAFile);
    }
    let mut r = BufReader::new(file);
    let (header, offset) = read_header(&mut r)?;
    if header.fortran_order {
        return Err(NpyError::FortranOrder);
    }
    let (elem, big_endian) = elem_of(&header.descr, accept)?;
    let overflow = || NpyError::ShapeOverflow(header.shape.clone());
    let count = header.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).ok_or_else(overflow)?;
    let bytes = count.checked_mul(elem.size() as u64).ok_or_else(overflow)?;
    let got = meta.len().saturating_sub(offset);
    if got != bytes {
        return Err(NpyError::DataSize { expected: bytes, got });
    }
    let dims =
        header.shape.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>().map_err(|_| overflow())?;
    // (the element count fits a usize: NpyInfo::len multiplies the dims unchecked)
    usize::try_from(count).map_err(|_| overflow())?;
    Ok((r, NpyInfo { dims, elem }, big_endian))
}

/// The element type and byte order of a `descr` such as `<f4`, if it is one of `accept`.
fn elem_of(descr: &str, accept: &[Elem]) -> Result<(Elem, bool), NpyError> {
    let (big_endian, code) = match descr.as_bytes().first() {
        Some(b'<') => (false, &descr[1..]),
        Some(b'>') => (true, &descr[1..]),
        Some(b'=' | b'|') => (cfg!(target_endian = "big"), &descr[1..]),
        _ => (cfg!(target_endian = "big"), descr),
    };
    let elem = match code {
        "f4" => Some(Elem::F32),
        "f2" => Some(Elem::F16),
        "i8" => Some(Elem::I64),
        "i4" => Some(Elem::I32),
        _ => None,
    };
    match elem {
        Some(e) if accept.contains(&e) => Ok((e, big_endian)),
        _ => {
            let expected: Vec<&str> = accept.iter().map(|e| e.name()).collect();
            // the descr came from the header: at most MAX_HEADER_BYTES, shown escaped on one line
            let found: String = descr.chars().take(40).flat_map(char::escape_debug).collect();
            Err(NpyError::Dtype { found, expected: expected.join(" or ") })
        }
    }
}

/// `n` elements of `N` bytes each, decoded in blocks into a vector allocated up front (fallibly).
fn read_body<T, const N: usize>(
    r: &mut impl Read,
    n: usize,
    big_endian: bool,
    le: fn([u8; N]) -> T,
    be: fn([u8; N]) -> T,
) -> Result<Vec<T>, NpyError> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| NpyError::OutOfMemory(n as u64 * N as u64))?;
    let mut buf = vec![0u8; N * 8192];
    while out.len() < n {
        let k = (n - out.len()).min(8192);
        r.read_exact(&mut buf[..k * N])?;
        let decode = if big_endian { be } else { le };
        out.extend(buf[..k * N].chunks_exact(N).map(|c| decode(c.try_into().expect("chunks of N bytes"))));
    }
    Ok(out)
}

/// Reads magic, version, header length and header; returns the header and the data's offset.
fn read_header(r: &mut impl Read) -> Result<(Header, u64), NpyError> {
    // a file that ends early is malformed, not an I/O failure
    let cut_short = |e: std::io::Error, instead: NpyError| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => instead,
        _ => NpyError::Io(e),
    };
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre).map_err(|e| cut_short(e, NpyError::Magic))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(NpyError::Magic);
    }
    let (len, pre_len) = match (pre[6], pre[7]) {
        (1, 0) => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).map_err(|e| cut_short(e, NpyError::Magic))?;
            (u16::from_le_bytes(b) as u64, 10)
        }
        (2 | 3, 0) => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).map_err(|e| cut_short(e, NpyError::Magic))?;
            (u32::from_le_bytes(b) as u64, 12)
        }
        (major, minor) => return Err(NpyError::Version(major, minor)),
    };
    if len > MAX_HEADER_BYTES as u64 {
        return Err(NpyError::HeaderTooLarge { len, max: MAX_HEADER_BYTES });
    }
    let mut text = vec![0u8; len as usize];
    let short = NpyError::HeaderSyntax { at: 0, what: "the file ends inside the header" };
    r.read_exact(&mut text).map_err(|e| cut_short(e, short))?;
    Ok((parse_header(&text)?, pre_len + len))
}

/// Parses the dict literal of a plain array's header (see the module docs).
fn parse_header(text: &[u8]) -> Result<Header, NpyError> {
    check_nesting(text)?;
    let mut p = Parser { s: text, at: 0 };
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    p.expect(b'{', "expected '{'")?;
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.skip_ws();
        p.expect(b':', "expected ':' after a key")?;
        p.skip_ws();
        let repeated = match key {
            "descr" => descr.replace(p.string()?.to_string()).is_some(),
            "fortran_order" => fortran_order.replace(p.boolean()?).is_some(),
            "shape" => shape.replace(p.shape()?).is_some(),
            _ => true,
        };
        if repeated {
            return Err(NpyError::BadKey(key.chars().take(40).collect()));
        }
        p.skip_ws();
        if !p.eat(b',') {
            p.skip_ws();
            p.expect(b'}', "expected ',' or '}'")?;
            break;
        }
    }
    p.skip_ws();
    if p.at != text.len() {
        return Err(p.error("unexpected text after the dict"));
    }
    Ok(Header {
        descr: descr.ok_or(NpyError::MissingKey("descr"))?,
        fortran_order: fortran_order.ok_or(NpyError::MissingKey("fortran_order"))?,
        shape: shape.ok_or(NpyError::MissingKey("shape"))?,
    })
}

/// Refuses brackets nested deeper than [`MAX_NESTING`] (outside string literals), in one scan.
fn check_nesting(text: &[u8]) -> Result<(), NpyError> {
    let (mut depth, mut quote) = (0usize, None);
    for &c in text {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, b'\'' | b'"') => quote = Some(c),
            (None, b'{' | b'(' | b'[') => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(NpyError::HeaderNesting { max: MAX_NESTING });
                }
            }
            (None, b'}' | b')' | b']') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A cursor over the header text; every step moves forward, so parsing is linear.
struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl<'a> Parser<'a> {
    fn error(&self, what: &'static str) -> NpyError {
        NpyError::HeaderSyntax { at: self.at, what }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.at += hit as usize;
        hit
    }

    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), NpyError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.error(what))
        }
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.at += 1;
        }
    }

    /// A quoted string without escapes (`'<f4'`, `"shape"`).
    fn string(&mut self) -> Result<&'a str, NpyError> {
        let q = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(self.error("expected a quoted string")),
        };
        let start = self.at + 1;
        let len = self.s[start..].iter().position(|&c| c == q).ok_or_else(|| self.error("unterminated string"))?;
        let body = &self.s[start..start + len];
        if body.iter().any(|&c| c == b'\\' || c < 0x20) {
            return Err(self.error("escapes and control characters in strings are not supported"));
        }
        self.at = start + len + 1;
        std::str::from_utf8(body).map_err(|_| self.error("a string is not UTF-8"))
    }

    fn boolean(&mut self) -> Result<bool, NpyError> {
        for (word, value) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.at..].starts_with(word) {
                self.at += word.len();
                return Ok(value);
            }
        }
        Err(self.error("expected True or False"))
    }

    /// A tuple or list of non-negative integers (a trailing comma allowed, Python 2's `L` too).
    fn shape(&mut self) -> Result<Vec<u64>, NpyError> {
        let close = match self.peek() {
            Some(b'(') => b')',
            Some(b'[') => b']',
            _ => return Err(self.error("expected a tuple for the shape")),
        };
        self.at += 1;
        let mut dims = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(close) {
                return Ok(dims);
            }
            dims.push(self.integer()?);
            self.skip_ws();
            if !self.eat(b',') {
                self.skip_ws();
                self.expect(close, "expected ',' or the end of the shape")?;
                return Ok(dims);
            }
        }
    }

    fn integer(&mut self) -> Result<u64, NpyError> {
        let start = self.at;
        let mut v = 0u64;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add((d - b'0') as u64))
                .ok_or_else(|| self.error("a dimension does not fit in 64 bits"))?;
            self.at += 1;
        }
        if self.at == start {
            return Err(self.error("expected a non-negative integer"));
        }
        self.eat(b'L');
        Ok(v)
    }
}

#[cfg(test)]
#[path = "npy_tests.rs"]
mod tests;
