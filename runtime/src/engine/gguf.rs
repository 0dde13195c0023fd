//! GGUF v3 (and v2) reader: metadata, tensor infos and the tensor bytes of a
//! memory-mapped file.
//!
//! Every length, count and offset read from the file is checked against the
//! bytes that are really there before it is used, so a truncated or corrupt
//! file becomes a [`GgufError`] naming the file, the key or tensor and the
//! problem, never a panic or a huge allocation. It does not interpret the
//! model (see [`super::config`]) nor compute with the tensors (see
//! [`super::cpu`]). [`write_gguf`] serialises small files for tests and tools.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// GGUF magic: the bytes "GGUF".
const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting limit for array values: deeper files are rejected, not recursed.
const MAX_ARRAY_DEPTH: usize = 8;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// Element types of tensor data this crate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
    BF16,
}

impl GgmlType {
    /// The type for a ggml type id, `None` when unsupported.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }

    /// Elements per block (1 for plain floats).
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// Bytes taken by `n` elements, `None` if `n` is not a whole number of
    /// blocks or the size overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let be = self.block_elems() as u64;
        if !n.is_multiple_of(be) {
            return None;
        }
        (n / be).checked_mul(self.block_bytes() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q6K => "Q6_K",
            Self::BF16 => "BF16",
        };
        f.write_str(name)
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The GGUF value-type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::String(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
        }
    }

    /// The value as a non-negative integer, if it is an integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
}

/// What went wrong reading a GGUF file. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (first bytes {found:?}, expected \"GGUF\")")]
    BadMagic { path: String, found: Vec<u8> },
    #[error("{path}: GGUF version {version} is not supported (only 2 and 3)")]
    UnsupportedVersion { path: String, version: u32 },
    #[error("{path}: truncated: {what} needs bytes up to {needed}, the file has {len}")]
    Truncated {
        path: String,
        what: String,
        needed: u64,
        len: u64,
    },
    #[error("{path}: {what}: {reason}")]
    Invalid {
        path: String,
        what: String,
        reason: String,
    },
    #[error("{path}: tensor {tensor}: unsupported tensor type id {type_id}")]
    UnsupportedType {
        path: String,
        tensor: String,
        type_id: u32,
    },
    #[error("{path}: metadata key {key} is missing")]
    MissingKey { path: String, key: String },
    #[error("{path}: metadata key {key}: expected {expected}, found {found}")]
    WrongType {
        path: String,
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("{path}: tensor {tensor} is missing")]
    MissingTensor { path: String, tensor: String },
}

/// Where a tensor lives and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Byte length of the data.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The bytes behind a GGUF file: a read-only map of the file or an owned
/// buffer (tests, files built in memory).
pub enum GgufBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl GgufBytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. Tensor data is not copied: [`GgufFile::tensor_data`]
/// borrows it from the map.
pub struct GgufFile {
    path: String,
    bytes: Arc<GgufBytes>,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let name = path.display().to_string();
        let io = |source| GgufError::Io {
            path: name.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; like every mmap user we rely on the
        // file not being truncated underneath us while it is mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(name, GgufBytes::Mapped(map))
    }

    /// Parses a file held in memory; `name` is used in error messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(name.to_string(), GgufBytes::Owned(bytes))
    }

    fn parse(path: String, bytes: GgufBytes) -> Result<Self, GgufError> {
        let data = bytes.as_slice();
        let mut r = Reader {
            path: &path,
            data,
            pos: 0,
        };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                found: magic.to_vec(),
            });
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each metadata entry takes at least 12 bytes, each tensor info at
        // least 24: counts larger than the file are corrupt.
        r.check_count(n_kv, 12, "metadata count")?;
        r.check_count(n_tensors, 24, "tensor count")?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("type of metadata key {key}"))?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }

        let mut infos = Vec::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("name of tensor #{i}"))?;
            let n_dims = r.u32(&format!("tensor {name}: dimension count"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.invalid(
                    format!("tensor {name}"),
                    format!("{n_dims} dimensions (expected 1 to {MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(r.u64(&format!("tensor {name}: dimension {d}"))?);
            }
            let type_id = r.u32(&format!("tensor {name}: type"))?;
            let rel_offset = r.u64(&format!("tensor {name}: offset"))?;
            let Some(ty) = GgmlType::from_id(type_id) else {
                return Err(GgufError::UnsupportedType {
                    path: path.clone(),
                    tensor: name,
                    type_id,
                });
            };
            infos.push((name, dims, ty, rel_offset));
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(r.invalid(
                        "general.alignment".into(),
                        format!("{v:?} is not a power of two"),
                    ));
                }
            },
        };
        let header_end = r.pos as u64;
        let data_start = header_end.div_ceil(alignment) * alignment;
        let file_len = data.len() as u64;

        let mut tensors = Vec::with_capacity(infos.len());
        let mut by_name = HashMap::with_capacity(infos.len());
        for (name, dims, ty, rel_offset) in infos {
            let what = format!("tensor {name}");
            let n = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| r.invalid(what.clone(), format!("bad dimensions {dims:?}")))?;
            if !dims[0].is_multiple_of(ty.block_elems() as u64) {
                return Err(r.invalid(
                    what,
                    format!(
                        "row length {} is not a multiple of the {ty} block size {}",
                        dims[0],
                        ty.block_elems()
                    ),
                ));
            }
            let n_bytes = ty
                .bytes_for(n)
                .ok_or_else(|| r.invalid(what.clone(), "size overflows".into()))?;
            if !rel_offset.is_multiple_of(alignment) {
                return Err(r.invalid(
                    what,
                    format!("data offset {rel_offset} is not aligned to {alignment}"),
                ));
            }
            let offset = data_start
                .checked_add(rel_offset)
                .ok_or_else(|| r.invalid(what.clone(), "offset overflows".into()))?;
            let end = offset
                .checked_add(n_bytes)
                .ok_or_else(|| r.invalid(what.clone(), "offset overflows".into()))?;
            if end > file_len {
                return Err(GgufError::Truncated {
                    path: path.clone(),
                    what: format!("data of tensor {name} ({ty}, {dims:?})"),
                    needed: end,
                    len: file_len,
                });
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(r.invalid(what, "appears twice".into()));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
            });
        }

        Ok(Self {
            path,
            bytes: Arc::new(bytes),
            version,
            metadata,
            tensors,
            by_name,
        })
    }

    /// The file name used in error messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The whole file's bytes, shared (for weights that borrow from it).
    pub fn bytes(&self) -> &Arc<GgufBytes> {
        &self.bytes
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// Whether a tensor called `name` exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The bytes of a tensor (bounds were checked at parse time).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let data = self.bytes.as_slice();
        let start = info.offset as usize;
        &data[start..start + info.n_bytes as usize]
    }

    /// The metadata value at `key`.
    pub fn get(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    fn wrong(&self, key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: found.type_name().to_string(),
        }
    }

    /// An integer metadata value.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    /// A numeric metadata value as f64.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| self.wrong(key, "a number", v))
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.get(key)?;
        v.as_str().ok_or_else(|| self.wrong(key, "a string", v))
    }

    /// An array metadata value.
    pub fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        match self.get(key)? {
            MetaValue::Array(a) => Ok(a),
            v => Err(self.wrong(key, "an array", v)),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong(key, "an array of strings", v))
            })
            .collect()
    }
}

/// A bounds-checked little-endian cursor over the header.
struct Reader<'a> {
    path: &'a str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn invalid(&self, what: String, reason: String) -> GgufError {
        GgufError::Invalid {
            path: self.path.to_string(),
            what,
            reason,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                path: self.path.to_string(),
                what: what.to_string(),
                needed: self.pos as u64 + n as u64,
                len: self.data.len() as u64,
            });
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Fails when `count` items of at least `min_size` bytes cannot fit in
    /// what is left of the file.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<usize, GgufError> {
        let needed = count.saturating_mul(min_size);
        if needed > self.remaining() as u64 {
            return Err(GgufError::Truncated {
                path: self.path.to_string(),
                what: format!("{what} {count}"),
                needed: (self.pos as u64).saturating_add(needed),
                len: self.data.len() as u64,
            });
        }
        Ok(count as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let len = self.check_count(len, 1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.invalid(what.to_string(), "not valid UTF-8".into()))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(key)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(key)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    return Err(self.invalid(
                        format!("metadata key {key}"),
                        format!("bool byte {b} is neither 0 nor 1"),
                    ));
                }
            },
            8 => MetaValue::String(self.string(&format!("metadata key {key}"))?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid(
                        format!("metadata key {key}"),
                        format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    ));
                }
                let elem_ty = self.u32(key)?;
                let len = self.u64(key)?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => 1,
                };
                let len = self.check_count(len, min_size, &format!("metadata key {key}"))?;
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(key)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(self.invalid(
                    format!("metadata key {key}"),
                    format!("unknown value type {other}"),
                ));
            }
        })
    }
}

/// A tensor to write with [`write_gguf`]: name, ggml dims, type, raw bytes.
pub struct TensorToWrite<'a> {
    pub name: &'a str,
    pub dims: &'a [u64],
    pub ty: GgmlType,
    pub data: &'a [u8],
}

/// Serialises a GGUF v3 file (alignment 32). For tests and tools that build
/// small models; `data` must hold exactly the tensor's bytes.
pub fn write_gguf(metadata: &[(&str, MetaValue)], tensors: &[TensorToWrite<'_>]) -> Vec<u8> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(u8::from(*x)),
            MetaValue::String(s) => put_str(out, s),
            MetaValue::Array(items) => {
                let elem_ty = items.first().map_or(4, MetaValue::type_id);
                out.extend_from_slice(&elem_ty.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    put_value(out, item);
                }
            }
            MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
    let align = DEFAULT_ALIGNMENT as usize;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        out.extend_from_slice(&value.type_id().to_le_bytes());
        put_value(&mut out, value);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ty.id().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.data.len().div_ceil(align) * align;
    }
    out.resize(out.len().div_ceil(align) * align, 0);
    for t in tensors {
        out.extend_from_slice(t.data);
        out.resize(out.len().div_ceil(align) * align, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn small_file() -> Vec<u8> {
        let a = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let q = vec![7u8; 34 * 2];
        write_gguf(
            &[
                ("general.architecture", MetaValue::String("llama".into())),
                ("llama.block_count", MetaValue::U32(2)),
                ("x.eps", MetaValue::F32(1e-5)),
                (
                    "tokenizer.ggml.tokens",
                    MetaValue::Array(vec![
                        MetaValue::String("a".into()),
                        MetaValue::String("b".into()),
                    ]),
                ),
            ],
            &[
                TensorToWrite {
                    name: "a",
                    dims: &[3, 2],
                    ty: GgmlType::F32,
                    data: &a,
                },
                TensorToWrite {
                    name: "q",
                    dims: &[32, 2],
                    ty: GgmlType::Q8_0,
                    data: &q,
                },
            ],
        )
    }

    #[test]
    fn a_written_file_reads_back() {
        let f = GgufFile::from_bytes("t.gguf", small_file()).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap(),
            ["a", "b"]
        );
        let a = f.tensor("a").unwrap();
        assert_eq!(a.dims, [3, 2]);
        assert_eq!(f.tensor_data(a), f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let q = f.tensor("q").unwrap();
        assert_eq!(q.n_bytes, 68);
        assert!(f.tensor_data(q).iter().all(|&b| b == 7));
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let bytes = small_file();
        let err = GgufFile::from_bytes("cut.gguf", bytes[..bytes.len() - 40].to_vec())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cut.gguf") && err.contains("tensor q"),
            "{err}"
        );

        let err = GgufFile::from_bytes("x.gguf", b"GGML....".to_vec())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a GGUF file"), "{err}");

        let f = GgufFile::from_bytes("t.gguf", bytes).unwrap();
        let err = f.get_u64("general.architecture").unwrap_err().to_string();
        assert!(
            err.contains("general.architecture") && err.contains("string"),
            "{err}"
        );
        let err = f.tensor("nope").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn an_unsupported_type_is_named() {
        let mut bytes = small_file();
        // Patch the type id of tensor "a" (after its dims) to 6 (Q5_0).
        let needle = [b'a', 2, 0, 0, 0];
        let at = bytes.windows(5).position(|w| w == needle).unwrap() + 5 + 16;
        bytes[at..at + 4].copy_from_slice(&6u32.to_le_bytes());
        let err = GgufFile::from_bytes("t.gguf", bytes)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor a") && err.contains("type id 6"),
            "{err}"
        );
    }

    #[test]
    fn a_huge_count_does_not_allocate() {
        let mut bytes = small_file();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = GgufFile::from_bytes("t.gguf", bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("metadata count"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = GgufFile::from_bytes("r.gguf", bytes);
        }

        #[test]
        fn truncations_and_mutations_never_panic(
            cut in 0usize..1000,
            flips in proptest::collection::vec((0usize..1000, any::<u8>()), 0..6),
        ) {
            let mut bytes = small_file();
            for (at, b) in flips {
                let n = bytes.len();
                bytes[at % n] = b;
            }
            let len = bytes.len();
            bytes.truncate(len - cut % len);
            if let Ok(f) = GgufFile::from_bytes("m.gguf", bytes) {
                for t in f.tensors() {
                    let _ = f.tensor_data(t);
                }
            }
        }
    }
}
