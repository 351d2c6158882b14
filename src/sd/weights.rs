//! Checked loading of safetensors weights.
//!
//! A model is built twice: first against a probe that answers every request with a zero-cost
//! placeholder and writes down which tensor with which shape was asked for, then, only if every
//! request matches the files, against the real memory-mapped tensors. So a bad file is reported
//! as a whole (every missing tensor, every wrong shape, each with its file), before anything is
//! loaded onto the device. Only the headers are read to check: on the CPU, a tensor stored in
//! the dtype asked for is used in place in the mapped file ([`crate::util::mapped`]), so
//! loading reads no weight at all; the others are converted as they are built.
//!
//! The model asks for tensors by their diffusers names; a name map turns those into the file's
//! keys where a file names them otherwise (a single-file checkpoint, a text encoder saved
//! without its `text_model.` prefix). A 1x1 convolution kernel is taken where the model has a
//! linear layer (the original VAE's attention).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::safetensors_check::{diagnose_bytes, diagnose_file};
use crate::error::{root_cause, Error, Result, WeightProblem};
use crate::util::mapped::Mapping;

/// How the model's tensor names become a file's keys.
pub type NameMap = Box<dyn Fn(&str) -> String + Send + Sync>;

/// Where a tensor's bytes are.
struct Entry {
    shape: Vec<usize>,
    dtype: safetensors::Dtype,
    /// Index into `files`.
    file: usize,
    /// Byte range in that file.
    bytes: std::ops::Range<usize>,
}

/// The safetensors files of one model component (`unet`, `vae`, ...), mapped and indexed.
pub struct WeightFiles {
    component: String,
    files: Vec<PathBuf>,
    maps: Vec<Mapping>,
    index: HashMap<String, Entry>,
    /// The model's names -> the files' keys (`None`: the same).
    names: Option<NameMap>,
    /// The names the last build asked for.
    requested: Mutex<Vec<String>>,
}

/// Whether a tensor of shape `found` serves where `expected` is asked: the same shape, or a 1x1
/// convolution kernel `[a, b, 1, 1]` for a matrix `[a, b]`.
fn fits(found: &[usize], expected: &[usize]) -> bool {
    found == expected || (found.len() == 4 && found[2..] == [1, 1] && found[..2] == *expected)
}

impl WeightFiles {
    /// Maps `files` and validates their headers. A truncated or corrupt file is an error that
    /// names it.
    pub fn open(component: &str, files: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            if !path.is_file() {
                return Err(Error::io(
                    path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "weight file not found"),
                ));
            }
            // SAFETY: weight files are read, never written, while a model is loaded; one
            // truncated by another program meanwhile is the mmap hazard `Mapping::open` names.
            let map = unsafe { Mapping::open(path) }.map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::Safetensors {
                    path: path.clone(),
                    msg: diagnose_file(path).unwrap_or_else(|| e.to_string()),
                },
                _ => Error::io(path, e),
            })?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(map.bytes()).map_err(|e| {
                Error::Safetensors {
                    path: path.clone(),
                    msg: diagnose_bytes(map.bytes()).unwrap_or_else(|| e.to_string()),
                }
            })?;
            let data_start = 8 + n;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                index.insert(
                    name,
                    Entry {
                        shape: info.shape.clone(),
                        dtype: info.dtype,
                        file: i,
                        bytes: data_start + a..data_start + b,
                    },
                );
            }
            maps.push(map);
        }
        Ok(Self {
            component: component.to_string(),
            files: files.to_vec(),
            maps,
            index,
            names: None,
            requested: Mutex::new(vec![]),
        })
    }

    /// The files' keys of the model's names are `names(name)`.
    pub fn with_names(mut self, names: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.names = Some(Box::new(names));
        self
    }

    /// The file key of a model name.
    fn key<'n>(&self, name: &'n str) -> std::borrow::Cow<'n, str> {
        match &self.names {
            Some(f) => std::borrow::Cow::Owned(f(name)),
            None => std::borrow::Cow::Borrowed(name),
        }
    }

    /// The shape of the tensor the files store under `key`.
    pub fn shape_of(&self, key: &str) -> Option<Vec<usize>> {
        self.index.get(key).map(|e| e.shape.clone())
    }

    /// Whether any key starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.index.keys().any(|k| k.starts_with(prefix))
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Names and shapes of every tensor in the files.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.index
            .iter()
            .map(|(k, e)| (k.as_str(), e.shape.as_slice()))
    }

    /// Builds a model with `build`, after checking that every tensor it asks for is present with
    /// the right shape. Tensors are converted to `dtype` on `device`.
    pub fn build<M>(
        &self,
        dtype: DType,
        device: &Device,
        build: impl Fn(VarBuilder) -> candle_core::Result<M>,
    ) -> Result<M> {
        self.check(&build)?;
        let vb = VarBuilder::from_backend(Box::new(Real(self)), dtype, device.clone());
        build(vb).map_err(|e| self.candle_error(e))
    }

    /// Builds `build` against placeholders: every tensor it asks for must be in the files with
    /// its shape (all problems reported at once), and the build must succeed.
    fn check<M>(&self, build: impl Fn(VarBuilder) -> candle_core::Result<M>) -> Result<()> {
        let probe = Probe {
            files: self,
            problems: Mutex::new(Vec::new()),
        };
        let dry = {
            let vb = VarBuilder::from_backend(Box::new(&probe), DType::F32, Device::Cpu);
            build(vb)
        };
        let mut problems = probe
            .problems
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        if !problems.is_empty() {
            problems.sort_by(|a, b| problem_key(a).cmp(problem_key(b)));
            problems.dedup();
            let hint = self.hint(&problems);
            return Err(Error::Weights {
                component: self.component.clone(),
                files: self.files.clone(),
                problems,
                hint,
            });
        }
        // The dry run can only fail for reasons other than the weights (e.g. a config the
        // constructors refuse): report that as it is.
        drop(dry.map_err(|e| self.candle_error(e))?);
        Ok(())
    }

    fn candle_error(&self, e: candle_core::Error) -> Error {
        Error::Config {
            path: self.files.first().cloned().unwrap_or_default(),
            msg: format!("building the {} failed: {}", self.component, root_cause(&e)),
        }
    }

    /// When most tensors are missing, the likely reason: the file names them with a prefix the
    /// model does not use, or without one it does (a single-file checkpoint, a text encoder
    /// saved without `text_model.`).
    fn hint(&self, problems: &[WeightProblem]) -> Option<String> {
        if self.names.is_some() {
            // The names were mapped on purpose: the layout is known, the tensors are not there.
            return None;
        }
        let missing: Vec<&str> = problems
            .iter()
            .filter_map(|p| match p {
                WeightProblem::Missing { tensor, .. } => Some(tensor.as_str()),
                _ => None,
            })
            .collect();
        if missing.len() < 4 || missing.len() * 2 < problems.len() {
            return None;
        }
        let found = |key: &str| self.index.contains_key(key);
        // A prefix the file has: `PREFIX.name` holds the tensor for most names.
        let file_prefixes: std::collections::BTreeSet<&str> = self
            .index
            .keys()
            .filter_map(|k| k.split_once('.').map(|(p, _)| p))
            .collect();
        for p in file_prefixes {
            let hits = missing
                .iter()
                .filter(|m| found(&format!("{p}.{m}")))
                .count();
            if hits * 2 > missing.len() {
                return Some(format!(
                    "the file names its tensors `{p}.*`, one level deeper than the model expects"
                ));
            }
        }
        // A prefix the model expects that the file lacks.
        let stripped = missing
            .iter()
            .filter(|m| m.split_once('.').is_some_and(|(_, rest)| found(rest)))
            .count();
        if stripped * 2 > missing.len() {
            let p = missing[0].split_once('.').map_or("", |(p, _)| p);
            return Some(format!(
                "the file names its tensors without the prefix `{p}.`"
            ));
        }
        let keys: Vec<&String> = self.index.keys().take(3).collect();
        Some(format!(
            "the file's tensors are named otherwise (e.g. {}): is it another kind of model, or \
             a single-file checkpoint (give the file itself as the model)?",
            keys.iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// The tensor `name` as `dtype` on `device`: in place in the mapped file where it can be
    /// (on the CPU, stored as `dtype`), else converted from the file's bytes.
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let key = self.key(name);
        let Some(e) = self.index.get(key.as_ref()) else {
            candle_core::bail!("cannot find tensor {name}")
        };
        let map = &self.maps[e.file];
        if device.is_cpu() && DType::try_from(e.dtype).ok() == Some(dtype) {
            let shape = e.shape.as_slice();
            let range = e.bytes.clone();
            // SAFETY: the tensors made here are only read. Candle writes a storage in place
            // only through `slice_set`, `const_set` (`zero_set`, `one_set`), `scatter_set`,
            // `scatter_add_set`, `inplace_op*` and `Var::set`; this crate calls none of them on
            // a loaded weight, and a `Var` made from one (`Var::from_tensor`) is a copy. The
            // other views of these bytes (`bytes` below and in `fingerprint`, the same tensor
            // loaded twice) only read too.
            let in_place = unsafe {
                match dtype {
                    DType::F32 => map
                        .vec::<f32>(range)
                        .map(|v| Tensor::from_vec(v, shape, device)),
                    DType::F16 => map
                        .vec::<half::f16>(range)
                        .map(|v| Tensor::from_vec(v, shape, device)),
                    DType::BF16 => map
                        .vec::<half::bf16>(range)
                        .map(|v| Tensor::from_vec(v, shape, device)),
                    _ => None,
                }
            };
            if let Some(t) = in_place {
                return t;
            }
        }
        use candle_core::safetensors::Load;
        let bytes = &map.bytes()[e.bytes.clone()];
        safetensors::tensor::TensorView::new(e.dtype, e.shape.clone(), bytes)
            .map_err(candle_core::Error::wrap)?
            .load(device)?
            .to_dtype(dtype)
    }
}

fn problem_key(p: &WeightProblem) -> &str {
    match p {
        WeightProblem::Missing { tensor, .. } | WeightProblem::WrongShape { tensor, .. } => tensor,
    }
}

/// Records what a model asks for and hands back placeholders that cost no memory.
struct Probe<'a> {
    files: &'a WeightFiles,
    problems: Mutex<Vec<WeightProblem>>,
}

impl Probe<'_> {
    fn report(&self, p: WeightProblem) {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p);
    }
}

fn placeholder(shape: &Shape, dtype: DType) -> candle_core::Result<Tensor> {
    Tensor::zeros((), dtype, &Device::Cpu)?.broadcast_as(shape)
}

impl SimpleBackend for &Probe<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        self.files
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_string());
        // Problems name the file's key: what the user finds in the file.
        let key = self.files.key(name);
        match self.files.index.get(key.as_ref()) {
            None => self.report(WeightProblem::Missing {
                tensor: key.into_owned(),
                expected: s.dims().to_vec(),
            }),
            Some(e) if !fits(&e.shape, s.dims()) => self.report(WeightProblem::WrongShape {
                tensor: key.into_owned(),
                file: self.files.files[e.file].clone(),
                expected: s.dims().to_vec(),
                found: e.shape.clone(),
            }),
            Some(_) => {}
        }
        placeholder(&s, dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        let key = self.files.key(name);
        match self.files.index.get(key.as_ref()) {
            Some(e) => placeholder(&Shape::from(e.shape.clone()), dtype),
            None => {
                self.report(WeightProblem::Missing {
                    tensor: key.into_owned(),
                    expected: vec![],
                });
                candle_core::bail!("cannot find tensor {name}")
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.files.index.contains_key(self.files.key(name).as_ref())
    }
}

/// A tensor's name and shape.
pub type TensorShape = (String, Vec<usize>);

/// A backend that answers every request with a zero-cost placeholder: building a model with it
/// costs no memory, which is enough to list its layers and tensors from a config alone.
#[derive(Default)]
struct Meta {
    /// The tensors asked for: name and shape, in order.
    asked: std::sync::Arc<Mutex<Vec<TensorShape>>>,
}

impl SimpleBackend for Meta {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        self.asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), s.dims().to_vec()));
        placeholder(&s, dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape known for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Builds a model whose weights are placeholders (no memory, not runnable): to read its
/// structure, e.g. the attention layers of a config.
pub fn build_meta<M>(
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> candle_core::Result<M> {
    build(VarBuilder::from_backend(
        Box::new(Meta::default()),
        DType::F32,
        Device::Cpu,
    ))
}

/// The tensors a model built by `build` asks for: name and shape, in order (a model's weight
/// layout, from its config alone).
pub fn tensors_asked(
    build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
) -> candle_core::Result<Vec<TensorShape>> {
    let meta = Meta::default();
    let asked = meta.asked.clone();
    build(VarBuilder::from_backend(
        Box::new(meta),
        DType::F32,
        Device::Cpu,
    ))?;
    let list = asked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(list)
}

/// Random weights for benchmarks: N(0, 1/fan_in) for matrices and kernels, 1 + N(0, 0.02) for
/// 1-D `weight`s (norm scales), N(0, 0.02) for biases. Drawn on `device`.
struct RandomInit;

impl SimpleBackend for RandomInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            Tensor::randn(0f32, (1.0 / fan_in.max(1) as f64).sqrt() as f32, &s, dev)?
        } else if name.ends_with("weight") {
            (Tensor::randn(0f32, 0.02, &s, dev)? + 1.0)?
        } else {
            Tensor::randn(0f32, 0.02, &s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape known for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// A VarBuilder that makes up random weights of whatever shape is asked for (benchmarks).
pub fn random_varbuilder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    // Seeding is best effort: the values only need to be plausible, not reproducible.
    let _ = device.set_seed(seed);
    VarBuilder::from_backend(Box::new(RandomInit), dtype, device.clone())
}

impl WeightFiles {
    /// Builds a model with `build` over trainable copies of the tensors it asks for (the
    /// files' values, as `Var`s in `dtype` on `device`), after the same checks as
    /// [`WeightFiles::build`]. Returns the model and its variables by the model's names.
    pub fn build_trainable<M>(
        &self,
        dtype: DType,
        device: &Device,
        build: impl Fn(VarBuilder) -> candle_core::Result<M>,
    ) -> Result<(M, Vec<(String, candle_core::Var)>)> {
        self.check(&build)?;
        let vars = Mutex::new(vec![]);
        let vb = VarBuilder::from_backend(
            Box::new(Trainable {
                files: self,
                vars: &vars,
            }),
            dtype,
            device.clone(),
        );
        let model = build(vb).map_err(|e| self.candle_error(e))?;
        Ok((model, vars.into_inner().unwrap_or_else(|e| e.into_inner())))
    }
}

/// Trainable copies of the real tensors.
struct Trainable<'a> {
    files: &'a WeightFiles,
    vars: &'a Mutex<Vec<(String, candle_core::Var)>>,
}

impl SimpleBackend for Trainable<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = Real(self.files).get(s, name, init, dtype, dev)?;
        let v = candle_core::Var::from_tensor(&t)?;
        let out = v.as_tensor().clone();
        self.vars
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), v));
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Real(self.files).get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        Real(self.files).contains_tensor(name)
    }
}

/// The real tensors, once the probe found nothing wrong.
struct Real<'a>(&'a WeightFiles);

impl SimpleBackend for Real<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut t = self.0.load(name, dtype, dev)?;
        if t.rank() == 4 && s.rank() == 2 && fits(t.dims(), s.dims()) {
            t = t.reshape(s.dims())?;
        }
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.index.contains_key(self.0.key(name).as_ref())
    }
}

/// Reads a whole safetensors file into named tensors (small files: references, noise, concepts).
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let data = crate::util::fs::read_regular(path)?;
    candle_core::safetensors::load_buffer(&data, device).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: diagnose_bytes(&data).unwrap_or_else(|| root_cause(&e)),
    })
}

impl WeightFiles {
    /// A fingerprint of the weights that survives a change of precision: for every tensor (by
    /// name), its name, shape and 64 evenly spaced values rounded to f16, hashed with SHA-256.
    /// The f32 and the fp16 files of one model give the same fingerprint; different weights
    /// almost surely do not. Reads a few bytes per tensor, not the whole file.
    ///
    /// With a name map the model's names are hashed (those the last build asked for), so a
    /// single-file checkpoint of a model has the fingerprint of its diffusers folder.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut names: Vec<String> = match &self.names {
            None => self.index.keys().cloned().collect(),
            Some(_) => self
                .requested
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        };
        names.sort();
        names.dedup();
        let mut h = Sha256::new();
        for name in &names {
            let key = self.key(name);
            let Some(e) = self.index.get(key.as_ref()) else {
                continue;
            };
            h.update(name.as_bytes());
            for d in &e.shape {
                h.update((*d as u64).to_le_bytes());
            }
            let n: usize = e.shape.iter().product();
            let data = &self.maps[e.file].bytes()[e.bytes.clone()];
            let samples = n.min(64);
            for s in 0..samples {
                let idx = if samples <= 1 {
                    0
                } else {
                    s * (n - 1) / (samples - 1)
                };
                let v = sample_as_f16(data, e.dtype, idx).unwrap_or(half::f16::NAN);
                h.update(v.to_bits().to_le_bytes());
            }
        }
        let digest = h.finalize();
        Ok(format!(
            "sha256:{}",
            digest[..12]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ))
    }
}

fn sample_as_f16(data: &[u8], dtype: safetensors::Dtype, idx: usize) -> Option<half::f16> {
    use safetensors::Dtype;
    let bytes = |n: usize| data.get(idx * n..idx * n + n);
    Some(match dtype {
        Dtype::F32 => half::f16::from_f32(f32::from_le_bytes(bytes(4)?.try_into().ok()?)),
        Dtype::F16 => half::f16::from_le_bytes(bytes(2)?.try_into().ok()?),
        Dtype::BF16 => {
            half::f16::from_f32(half::bf16::from_le_bytes(bytes(2)?.try_into().ok()?).to_f32())
        }
        Dtype::F64 => half::f16::from_f64(f64::from_le_bytes(bytes(8)?.try_into().ok()?)),
        _ => half::f16::from_f32(bytes(1)?[0] as f32),
    })
}
