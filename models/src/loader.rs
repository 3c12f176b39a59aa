//! Turns a model spec (a local path or a Hugging Face repo id) into a ready model and
//! tokenizer.
//!
//! Specs:
//! - `path/to/model.gguf`: a GGUF file (weights, tokenizer and chat template inside);
//! - `path/to/dir`: an HF checkpoint (`config.json`, `*.safetensors`, `tokenizer.json`),
//!   or a directory holding exactly one `.gguf`;
//! - `owner/name[@revision]`: an HF safetensors repo, fetched through the hub cache;
//! - `owner/name[@revision]:file.gguf`: one GGUF file of an HF repo.
//!
//! With [`LoadOptions::dummy`], the spec is a `config.json` (or a directory holding one)
//! and the weights are random ([`RandomWeights`]): any supported architecture at any size,
//! for speed measurements without a download. The tokenizer is the directory's
//! `tokenizer.json` if there is one, else [`ModelTokenizer::placeholder`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::error::{ModelError, Result};
use crate::llama::{self, Family};
use crate::tokenizer::ModelTokenizer;
use crate::weights::{GgufWeights, RandomFormat, RandomWeights, SafetensorsWeights, WeightSource};
use crate::{CausalLm, deepseek2, qwen2};

/// How to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// Weight dtype for safetensors checkpoints; default f32 on CPU, bf16 elsewhere.
    pub dtype: Option<DType>,
    /// Random weights for the config the spec names.
    pub dummy: Option<DummyWeights>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: None, dummy: None }
    }
}

/// Where a model runs, as written in configs and flags: `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("unknown device `{other}`: expected cpu, cuda or cuda:N")),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device (for CUDA: a context and a stream on GPU N).
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) if cfg!(feature = "cuda") => Device::new_cuda(n).map_err(|e| ModelError::Device {
                device: self.to_string(),
                // candle appends a backtrace to driver errors: keep the message line.
                message: e.to_string().lines().next().unwrap_or_default().to_string(),
            }),
            Self::Cuda(_) => Err(ModelError::Device {
                device: self.to_string(),
                message: "this ragnode was built without CUDA (build with `--features cuda`, see README)".into(),
            }),
        }
    }
}

/// Random weights instead of a checkpoint's.
#[derive(Clone, Copy, Debug)]
pub struct DummyWeights {
    pub format: RandomFormat,
    pub seed: u64,
}

/// A model ready to serve.
pub struct LoadedModel {
    pub model: Arc<dyn CausalLm>,
    pub tokenizer: Arc<ModelTokenizer>,
    /// A display name (file stem or repo id).
    pub name: String,
}

/// The files a spec resolved to.
#[derive(Debug)]
enum Resolved {
    Gguf(PathBuf),
    HfDir(HfFiles),
}

#[derive(Debug)]
struct HfFiles {
    config: PathBuf,
    weights: Vec<PathBuf>,
    tokenizer: PathBuf,
    tokenizer_config: Option<PathBuf>,
    generation_config: Option<PathBuf>,
}

/// Loads the model named by `spec`.
pub fn load_model(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    if let Some(dummy) = opts.dummy {
        return load_dummy(spec, opts, dummy);
    }
    let resolved = resolve(spec)?;
    tracing::info!(?resolved, "loading model");
    match resolved {
        Resolved::Gguf(path) => load_gguf(&path, opts, display_name(spec, &path)),
        Resolved::HfDir(files) => load_hf(&files, opts, display_name(spec, &files.config)),
    }
}

fn display_name(spec: &str, path: &Path) -> String {
    if Path::new(spec).exists() {
        match path.extension().and_then(|e| e.to_str()) {
            Some("gguf") => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            _ => {
                path.parent().and_then(|d| d.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
            }
        }
    } else {
        spec.to_string()
    }
}

/// The architectures ragnode runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    Llama(Family),
    DeepSeek2,
}

fn arch_from_name(arch: &str) -> Result<Arch> {
    match arch {
        "llama" | "LlamaForCausalLM" | "MistralForCausalLM" | "mistral" => Ok(Arch::Llama(Family::Llama)),
        "qwen2" | "Qwen2ForCausalLM" => Ok(Arch::Llama(Family::Qwen2)),
        "deepseek2" | "DeepseekV2ForCausalLM" | "DeepseekV3ForCausalLM" | "deepseek_v2" | "deepseek_v3" => {
            Ok(Arch::DeepSeek2)
        }
        other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
    }
}

/// A checkpoint's config, by architecture.
enum ArchConfig {
    Llama(llama::Config),
    DeepSeek2(deepseek2::Config),
}

impl ArchConfig {
    fn from_hf_json(path: &Path, json: &str) -> Result<Self> {
        let cfg_err = |message: String| ModelError::Config { path: path.into(), message };
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| cfg_err(e.to_string()))?;
        let arch = value["architectures"][0]
            .as_str()
            .or_else(|| value["model_type"].as_str())
            .ok_or_else(|| cfg_err("neither `architectures` nor `model_type` is set".into()))?;
        match arch_from_name(arch)? {
            Arch::Llama(Family::Llama) => llama::config_from_hf_json(json).map(Self::Llama),
            Arch::Llama(Family::Qwen2) => qwen2::config_from_hf_json(json).map(Self::Llama),
            Arch::DeepSeek2 => deepseek2::config_from_hf_json(json).map(Self::DeepSeek2),
        }
        .map_err(cfg_err)
    }

    fn vocab_size(&self) -> usize {
        match self {
            Self::Llama(c) => c.vocab_size,
            Self::DeepSeek2(c) => c.vocab_size,
        }
    }

    fn load(self, w: &mut WeightSource) -> Result<Arc<dyn CausalLm>> {
        Ok(match self {
            Self::Llama(c) => Arc::new(llama::Model::load(c, w)?),
            Self::DeepSeek2(c) => Arc::new(deepseek2::Model::load(c, w)?),
        })
    }
}

fn load_dummy(spec: &str, opts: &LoadOptions, dummy: DummyWeights) -> Result<LoadedModel> {
    let path = Path::new(spec);
    let config = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    let json = std::fs::read_to_string(&config).map_err(|source| ModelError::Io { path: config.clone(), source })?;
    let cfg = ArchConfig::from_hf_json(&config, &json)?;
    let dir = config.parent().unwrap_or(Path::new("."));
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        let opt = |n: &str| Some(dir.join(n)).filter(|p| p.is_file());
        ModelTokenizer::from_hf_files(
            &dir.join("tokenizer.json"),
            opt("tokenizer_config.json").as_deref(),
            opt("generation_config.json").as_deref(),
        )?
    } else {
        ModelTokenizer::placeholder(cfg.vocab_size())?
    };
    tracing::info!(config = %config.display(), ?dummy, "building a model with random weights");
    let mut source = WeightSource::Random(RandomWeights::new(dummy.format, dummy.seed, &opts.device));
    let model = cfg.load(&mut source)?;
    let name = format!(
        "dummy-{}",
        config
            .parent()
            .and_then(|d| d.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    );
    Ok(LoadedModel { model, tokenizer: Arc::new(tokenizer), name })
}

fn load_gguf(path: &Path, opts: &LoadOptions, name: String) -> Result<LoadedModel> {
    let g = GgufWeights::open(path, &opts.device)?;
    let arch =
        g.content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().ok_or_else(|| {
            ModelError::Gguf { path: path.into(), message: "metadata `general.architecture` is missing".into() }
        })?;
    let cfg_err = |message| ModelError::Config { path: path.into(), message };
    let cfg = match arch_from_name(&arch)? {
        Arch::Llama(family) => ArchConfig::Llama(llama::Config::from_gguf(&g.content, family, &arch).map_err(cfg_err)?),
        Arch::DeepSeek2 => ArchConfig::DeepSeek2(deepseek2::Config::from_gguf(&g.content).map_err(cfg_err)?),
    };
    let tokenizer = ModelTokenizer::from_gguf(&g.content)?;
    let mut source = WeightSource::Gguf(g);
    let model = cfg.load(&mut source)?;
    Ok(LoadedModel { model, tokenizer: Arc::new(tokenizer), name })
}

fn load_hf(files: &HfFiles, opts: &LoadOptions, name: String) -> Result<LoadedModel> {
    let json = std::fs::read_to_string(&files.config)
        .map_err(|source| ModelError::Io { path: files.config.clone(), source })?;
    let cfg = ArchConfig::from_hf_json(&files.config, &json)?;
    let dtype = opts.dtype.unwrap_or(if opts.device.is_cpu() { DType::F32 } else { DType::BF16 });
    let tokenizer = ModelTokenizer::from_hf_files(
        &files.tokenizer,
        files.tokenizer_config.as_deref(),
        files.generation_config.as_deref(),
    )?;
    let mut source = WeightSource::Safetensors(SafetensorsWeights::open(&files.weights, dtype, &opts.device)?);
    let model = cfg.load(&mut source)?;
    Ok(LoadedModel { model, tokenizer: Arc::new(tokenizer), name })
}

fn resolve(spec: &str) -> Result<Resolved> {
    let path = Path::new(spec);
    if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
            return Ok(Resolved::Gguf(path.to_path_buf()));
        }
        return Err(ModelError::NotFound { spec: spec.into(), reason: "a model file must be a .gguf".into() });
    }
    if path.is_dir() {
        return resolve_dir(spec, path);
    }
    if looks_like_repo_id(spec) {
        return resolve_hub(spec);
    }
    Err(ModelError::NotFound {
        spec: spec.into(),
        reason: "no such file or directory, and not a Hugging Face repo id (owner/name)".into(),
    })
}

fn resolve_dir(spec: &str, dir: &Path) -> Result<Resolved> {
    let config = dir.join("config.json");
    if config.is_file() {
        let weights = local_safetensors(dir)?;
        let tokenizer = dir.join("tokenizer.json");
        if !tokenizer.is_file() {
            return Err(ModelError::NotFound {
                spec: spec.into(),
                reason: format!("{} is missing", tokenizer.display()),
            });
        }
        let opt = |n: &str| Some(dir.join(n)).filter(|p| p.is_file());
        return Ok(Resolved::HfDir(HfFiles {
            config,
            weights,
            tokenizer,
            tokenizer_config: opt("tokenizer_config.json"),
            generation_config: opt("generation_config.json"),
        }));
    }
    let io = |source| ModelError::Io { path: dir.into(), source };
    let ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(Resolved::Gguf(one.clone())),
        [] => Err(ModelError::NotFound {
            spec: spec.into(),
            reason: "the directory has neither config.json nor a .gguf file".into(),
        }),
        _ => Err(ModelError::NotFound {
            spec: spec.into(),
            reason: "the directory holds several .gguf files; name one".into(),
        }),
    }
}

fn local_safetensors(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let shards = shards_from_index(&index)?;
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::NotFound {
        spec: dir.display().to_string(),
        reason: "no model.safetensors or model.safetensors.index.json".into(),
    })
}

fn shards_from_index(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io { path: index.into(), source })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Config { path: index.into(), message: e.to_string() })?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| ModelError::Config { path: index.into(), message: "`weight_map` is missing".into() })?;
    let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

fn looks_like_repo_id(spec: &str) -> bool {
    let repo = spec.split([':', '@']).next().unwrap_or("");
    let mut parts = repo.split('/');
    let ok = |s: Option<&str>| {
        s.is_some_and(|s| {
            !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// Splits `owner/name[@revision][:file]`.
fn parse_repo_spec(spec: &str) -> (String, Option<String>, Option<String>) {
    let (repo_rev, file) = match spec.split_once(':') {
        Some((a, f)) => (a, Some(f.to_string())),
        None => (spec, None),
    };
    match repo_rev.split_once('@') {
        Some((repo, rev)) => (repo.to_string(), Some(rev.to_string()), file),
        None => (repo_rev.to_string(), None, file),
    }
}

fn resolve_hub(spec: &str) -> Result<Resolved> {
    let (repo_id, revision, file) = parse_repo_spec(spec);
    let repo = match &revision {
        Some(rev) => hf_hub::Repo::with_revision(repo_id.clone(), hf_hub::RepoType::Model, rev.clone()),
        None => hf_hub::Repo::model(repo_id.clone()),
    };
    let hub = Hub::new(repo, &repo_id)?;
    if let Some(file) = file {
        return Ok(Resolved::Gguf(hub.get(&file)?));
    }
    let config = match hub.get("config.json") {
        Ok(c) => c,
        Err(e) => {
            let ggufs: Vec<String> =
                hub.list().unwrap_or_default().into_iter().filter(|f| f.ends_with(".gguf")).collect();
            if ggufs.is_empty() {
                return Err(e);
            }
            return Err(ModelError::NotFound {
                spec: spec.into(),
                reason: format!(
                    "the repo holds GGUF files; pick one as `{repo_id}:FILE`, e.g. `{repo_id}:{}`",
                    ggufs[0]
                ),
            });
        }
    };
    let weights = match hub.get("model.safetensors.index.json") {
        Ok(index) => shards_from_index(&index)?.iter().map(|s| hub.get(s)).collect::<Result<Vec<_>>>()?,
        Err(_) => vec![hub.get("model.safetensors")?],
    };
    Ok(Resolved::HfDir(HfFiles {
        config,
        weights,
        tokenizer: hub.get("tokenizer.json")?,
        tokenizer_config: hub.get("tokenizer_config.json").ok(),
        generation_config: hub.get("generation_config.json").ok(),
    }))
}

/// The hub: the local cache first, the network (with a progress bar) when allowed.
struct Hub {
    repo_id: String,
    cache: hf_hub::CacheRepo,
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl Hub {
    fn new(repo: hf_hub::Repo, repo_id: &str) -> Result<Self> {
        let cache = hf_hub::Cache::from_env().repo(repo.clone());
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        let api = if offline {
            None
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(true)
                .build()
                .map_err(|e| ModelError::Hub { repo: repo_id.into(), file: String::new(), reason: e.to_string() })?;
            Some(api.repo(repo))
        };
        Ok(Self { repo_id: repo_id.into(), cache, api })
    }

    fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(p) = self.cache.get(file) {
            return Ok(p);
        }
        let err = |reason: String| ModelError::Hub { repo: self.repo_id.clone(), file: file.into(), reason };
        match &self.api {
            None => {
                Err(err("it is not in the local hub cache and HF_HUB_OFFLINE is set; pass a local path instead".into()))
            }
            Some(api) => api.get(file).map_err(|e| {
                err(format!(
                    "{e}. If this machine is offline, pass a local path instead, or set HF_HUB_OFFLINE=1 to use only \
                     the local hub cache"
                ))
            }),
        }
    }

    fn list(&self) -> Result<Vec<String>> {
        let api = self.api.as_ref().ok_or_else(|| ModelError::Hub {
            repo: self.repo_id.clone(),
            file: String::new(),
            reason: "offline".into(),
        })?;
        let info = api.info().map_err(|e| ModelError::Hub {
            repo: self.repo_id.clone(),
            file: String::new(),
            reason: e.to_string(),
        })?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["cuda:", "cuda:x", "tpu", "metal"] {
            assert!(bad.parse::<DeviceSpec>().unwrap_err().contains("cpu, cuda or cuda:N"), "{bad}");
        }
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        assert!(matches!(DeviceSpec::Cpu.open(), Ok(Device::Cpu)));
        // In configs it is a plain string.
        let d: DeviceSpec = serde_json::from_str("\"cuda:2\"").unwrap();
        assert_eq!((d, serde_json::to_string(&d).unwrap()), (DeviceSpec::Cuda(2), "\"cuda:2\"".into()));
        assert!(serde_json::from_str::<DeviceSpec>("\"gpu:0\"").is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(DeviceSpec::Cuda(0).open().unwrap_err().to_string().contains("--features cuda"));
    }

    #[test]
    fn repo_specs() {
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(looks_like_repo_id("bartowski/Qwen2.5-0.5B-GGUF:Qwen2.5-0.5B-Q4_K_M.gguf"));
        assert!(!looks_like_repo_id("./model.gguf"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert_eq!(
            parse_repo_spec("o/n@main:f.gguf"),
            ("o/n".to_string(), Some("main".to_string()), Some("f.gguf".to_string()))
        );
    }

    #[test]
    fn missing_paths_are_clear_errors() {
        let err = resolve("/definitely/not/here.gguf").expect_err("must fail");
        assert!(err.to_string().contains("not found"), "{err}");
    }
}
