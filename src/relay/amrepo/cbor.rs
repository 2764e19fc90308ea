//! A small CBOR codec for automerge-repo's messages: a lenient, bounded decoder and an exact
//! (shortest-form) encoder. No I/O, no knowledge of the messages themselves (`wire.rs`).
//!
//! Lenient because the JavaScript encoder (cbor-x) writes non-minimal lengths (`b9 00 05` for a
//! map of five), `undefined` for missing fields and floats for integers; bounded because every
//! byte comes from a peer: a declared length is checked against the bytes that remain before
//! anything is allocated, nesting is capped, and so is the number of items in one message.

/// A decoded CBOR data item.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Uint(u64),
    /// A negative integer: the value is `-1 - n`.
    Neg(u64),
    Bytes(Vec<u8>),
    Text(String),
    Array(Vec<Value>),
    /// Entries in the order they came (keys of any type; duplicates kept).
    Map(Vec<(Value, Value)>),
    Tag(u64, Box<Value>),
    Bool(bool),
    Null,
    Undefined,
    Float(f64),
    /// Any other simple value.
    Simple(u8),
}

impl Value {
    /// The entry of a map under text key `key` (the first one), `None` for non-maps.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(k, Value::Text(t) if t == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Like [`get`](Self::get), but `null` and `undefined` count as absent (the JavaScript
    /// encoder writes `undefined` for a field that is not set).
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.get(key)
            .filter(|v| !matches!(v, Value::Null | Value::Undefined))
    }

    /// A text map with these entries, in this order.
    pub fn map<'a>(entries: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
        Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (Value::Text(k.to_string()), v))
                .collect(),
        )
    }

    /// Set text key `key` in a map (replacing every entry under it, or appending).
    pub fn set(&mut self, key: &str, value: Value) {
        if let Value::Map(entries) = self {
            entries.retain(|(k, _)| !matches!(k, Value::Text(t) if t == key));
            entries.push((Value::Text(key.to_string()), value));
        }
    }
}

/// Bounds on what one message may contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Deepest nesting of arrays, maps and tags.
    pub max_depth: usize,
    /// Most data items in one message (every array element, map key and value counts).
    pub max_items: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_depth: 16,
            max_items: 100_000,
        }
    }
}

/// Why bytes are not an acceptable CBOR message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the message ends in the middle of an item")]
    Truncated,
    #[error("an item declares {0} bytes or entries, more than the message holds")]
    TooLong(u64),
    #[error("nesting deeper than {0} levels")]
    TooDeep(usize),
    #[error("more than {0} items in one message")]
    TooManyItems(usize),
    #[error("text that is not UTF-8")]
    BadUtf8,
    #[error("malformed CBOR: {0}")]
    Malformed(&'static str),
    #[error("{0} bytes after the message's end")]
    Trailing(usize),
}

/// Decode exactly one item filling all of `bytes`.
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<Value, DecodeError> {
    let mut d = Decoder {
        bytes,
        pos: 0,
        items: 0,
        limits,
    };
    let v = d.item(0)?;
    match bytes.len() - d.pos {
        0 => Ok(v),
        n => Err(DecodeError::Trailing(n)),
    }
}

/// The "break" stop code of indefinite-length items, seen where an item should be.
const BREAK: u8 = 0xff;

struct Decoder<'a> {
    bytes: &'a [u8],
    pos: usize,
    items: usize,
    limits: DecodeLimits,
}

impl Decoder<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// The argument of an initial byte; `None` for indefinite length (info 31).
    fn argument(&mut self, info: u8) -> Result<Option<u64>, DecodeError> {
        Ok(Some(match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.byte()?),
            25 => u64::from(u16::from_be_bytes(self.fixed()?)),
            26 => u64::from(u32::from_be_bytes(self.fixed()?)),
            27 => u64::from_be_bytes(self.fixed()?),
            31 => return Ok(None),
            _ => return Err(DecodeError::Malformed("reserved additional information")),
        }))
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A length that must fit in what remains, each unit taking at least `unit` bytes.
    fn length(&self, n: u64, unit: usize) -> Result<usize, DecodeError> {
        match usize::try_from(n) {
            Ok(len) if len.saturating_mul(unit) <= self.remaining() => Ok(len),
            _ => Err(DecodeError::TooLong(n)),
        }
    }

    fn count_item(&mut self) -> Result<(), DecodeError> {
        self.items += 1;
        if self.items > self.limits.max_items {
            return Err(DecodeError::TooManyItems(self.limits.max_items));
        }
        Ok(())
    }

    fn at_break(&mut self) -> Result<bool, DecodeError> {
        match self.bytes.get(self.pos) {
            Some(&BREAK) => {
                self.pos += 1;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => Err(DecodeError::Truncated),
        }
    }

    fn item(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > self.limits.max_depth {
            return Err(DecodeError::TooDeep(self.limits.max_depth));
        }
        self.count_item()?;
        let initial = self.byte()?;
        let (major, info) = (initial >> 5, initial & 0x1f);
        match major {
            0 => Ok(Value::Uint(self.definite(info)?)),
            1 => Ok(Value::Neg(self.definite(info)?)),
            2 => Ok(Value::Bytes(self.string(2, info)?)),
            3 => String::from_utf8(self.string(3, info)?)
                .map(Value::Text)
                .map_err(|_| DecodeError::BadUtf8),
            4 => {
                let mut items = Vec::new();
                match self.argument(info)? {
                    Some(n) => {
                        let n = self.length(n, 1)?;
                        items.reserve(n);
                        for _ in 0..n {
                            items.push(self.item(depth + 1)?);
                        }
                    }
                    None => {
                        while !self.at_break()? {
                            items.push(self.item(depth + 1)?);
                        }
                    }
                }
                Ok(Value::Array(items))
            }
            5 => {
                let mut entries = Vec::new();
                match self.argument(info)? {
                    Some(n) => {
                        let n = self.length(n, 2)?;
                        entries.reserve(n);
                        for _ in 0..n {
                            let k = self.item(depth + 1)?;
                            let v = self.item(depth + 1)?;
                            entries.push((k, v));
                        }
                    }
                    None => {
                        while !self.at_break()? {
                            let k = self.item(depth + 1)?;
                            let v = self.item(depth + 1)?;
                            entries.push((k, v));
                        }
                    }
                }
                Ok(Value::Map(entries))
            }
            6 => {
                let tag = self.definite(info)?;
                Ok(Value::Tag(tag, Box::new(self.item(depth + 1)?)))
            }
            _ => self.simple(info),
        }
    }

    fn definite(&mut self, info: u8) -> Result<u64, DecodeError> {
        self.argument(info)?.ok_or(DecodeError::Malformed(
            "indefinite length on an integer or tag",
        ))
    }

    /// A byte or text string (major `major`), definite or made of definite chunks.
    fn string(&mut self, major: u8, info: u8) -> Result<Vec<u8>, DecodeError> {
        match self.argument(info)? {
            Some(n) => {
                let n = self.length(n, 1)?;
                Ok(self.take(n)?.to_vec())
            }
            None => {
                let mut out = Vec::new();
                while !self.at_break()? {
                    self.count_item()?;
                    let initial = self.byte()?;
                    if initial >> 5 != major {
                        return Err(DecodeError::Malformed("a string chunk of another type"));
                    }
                    let n = self.definite(initial & 0x1f)?;
                    let n = self.length(n, 1)?;
                    out.extend_from_slice(self.take(n)?);
                }
                Ok(out)
            }
        }
    }

    fn simple(&mut self, info: u8) -> Result<Value, DecodeError> {
        Ok(match info {
            20 => Value::Bool(false),
            21 => Value::Bool(true),
            22 => Value::Null,
            23 => Value::Undefined,
            24 => Value::Simple(self.byte()?),
            25 => Value::Float(half_to_f64(u16::from_be_bytes(self.fixed()?))),
            26 => Value::Float(f64::from(f32::from_be_bytes(self.fixed()?))),
            27 => Value::Float(f64::from_be_bytes(self.fixed()?)),
            31 => return Err(DecodeError::Malformed("a break outside an indefinite item")),
            28..=30 => return Err(DecodeError::Malformed("reserved simple value")),
            n => Value::Simple(n),
        })
    }
}

fn half_to_f64(h: u16) -> f64 {
    let exp = (h >> 10) & 0x1f;
    let mant = f64::from(h & 0x3ff);
    let v = match exp {
        0 => mant * 2f64.powi(-24),
        31 if mant == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + mant / 1024.0) * 2f64.powi(i32::from(e) - 15),
    };
    if h & 0x8000 != 0 {
        -v
    } else {
        v
    }
}

/// Encode `v` in shortest form (definite lengths, smallest argument).
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(&mut out, v);
    out
}

fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

fn write(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Uint(n) => head(out, 0, *n),
        Value::Neg(n) => head(out, 1, *n),
        Value::Bytes(b) => {
            head(out, 2, b.len() as u64);
            out.extend_from_slice(b);
        }
        Value::Text(t) => {
            head(out, 3, t.len() as u64);
            out.extend_from_slice(t.as_bytes());
        }
        Value::Array(items) => {
            head(out, 4, items.len() as u64);
            for i in items {
                write(out, i);
            }
        }
        Value::Map(entries) => {
            head(out, 5, entries.len() as u64);
            for (k, v) in entries {
                write(out, k);
                write(out, v);
            }
        }
        Value::Tag(t, inner) => {
            head(out, 6, *t);
            write(out, inner);
        }
        Value::Bool(false) => out.push(0xf4),
        Value::Bool(true) => out.push(0xf5),
        Value::Null => out.push(0xf6),
        Value::Undefined => out.push(0xf7),
        Value::Float(f) => {
            out.push(0xfb);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Simple(n) if *n < 24 => out.push(0xe0 | n),
        Value::Simple(n) => out.extend_from_slice(&[0xf8, *n]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(hex: &str) -> Result<Value, DecodeError> {
        decode(&hex::decode(hex).unwrap(), DecodeLimits::default())
    }

    #[test]
    fn non_minimal_lengths_undefined_and_floats_decode() {
        // {"a": undefined, "b": 1.5 (f64), "c": 1 (u16 form)} with a 16-bit map count.
        let v = dec("b90003616bf7616cfb3ff8000000000000616d190001").unwrap();
        assert_eq!(v.get("k"), Some(&Value::Undefined));
        assert_eq!(v.field("k"), None);
        assert_eq!(v.get("l"), Some(&Value::Float(1.5)));
        assert_eq!(v.get("m"), Some(&Value::Uint(1)));
        assert_eq!(dec("f93c00").unwrap(), Value::Float(1.0));
        assert_eq!(dec("fa3fc00000").unwrap(), Value::Float(1.5));
        // Indefinite array and text.
        assert_eq!(
            dec("9f01027f6161626262ffff").unwrap(),
            Value::Array(vec![
                Value::Uint(1),
                Value::Uint(2),
                Value::Text("abb".into())
            ])
        );
    }

    #[test]
    fn encoding_is_shortest_form_and_round_trips() {
        let v = Value::map([
            ("type", Value::Text("peer".into())),
            ("n", Value::Uint(300)),
            ("d", Value::Bytes(vec![1, 2, 3])),
            ("u", Value::Undefined),
            ("f", Value::Bool(false)),
            ("l", Value::Array(vec![Value::Neg(0)])),
        ]);
        let b = encode(&v);
        assert_eq!(b[0], 0xa6);
        assert_eq!(decode(&b, DecodeLimits::default()).unwrap(), v);
        assert_eq!(encode(&Value::Uint(24)), vec![0x18, 24]);
        assert_eq!(
            encode(&Value::Uint(1 << 32)),
            hex::decode("1b0000000100000000").unwrap()
        );
    }

    #[test]
    fn hostile_input_is_refused_without_allocating() {
        // A byte string claiming 2^64-1 bytes, an array claiming 2^32 items.
        assert!(matches!(
            dec("5bffffffffffffffff"),
            Err(DecodeError::TooLong(_))
        ));
        assert!(matches!(dec("9affffffff00"), Err(DecodeError::TooLong(_))));
        assert!(matches!(
            dec("bb7fffffffffffffff"),
            Err(DecodeError::TooLong(_))
        ));
        // 10,000 nested arrays.
        let deep = vec![0x81u8; 10_000];
        assert_eq!(
            decode(&deep, DecodeLimits::default()),
            Err(DecodeError::TooDeep(16))
        );
        let deep_indef = vec![0x9fu8; 10_000];
        assert!(decode(&deep_indef, DecodeLimits::default()).is_err());
        assert_eq!(dec("62ff00"), Err(DecodeError::BadUtf8));
        assert_eq!(dec("0102"), Err(DecodeError::Trailing(1)));
        assert_eq!(
            dec("ff"),
            Err(DecodeError::Malformed("a break outside an indefinite item"))
        );
        assert_eq!(dec(""), Err(DecodeError::Truncated));
        assert_eq!(dec("9f01"), Err(DecodeError::Truncated));
        let many = {
            let mut b = vec![0x9a, 0, 1, 0, 0];
            b.extend(std::iter::repeat_n(0u8, 65536));
            b
        };
        assert_eq!(
            decode(
                &many,
                DecodeLimits {
                    max_depth: 4,
                    max_items: 1000
                }
            ),
            Err(DecodeError::TooManyItems(1000))
        );
    }
}
