//! With the `cuda` feature: compiles `cuda/ragnode.cu` to PTX with nvcc (found as $NVCC,
//! $CUDA_ROOT/bin/nvcc or nvcc on PATH) for compute capability $CUDA_COMPUTE_CAP (default
//! 90); the PTX is embedded in the crate and JIT-loaded by the driver on first use.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda/ragnode.cu");
    for var in ["NVCC", "CUDA_ROOT", "CUDA_COMPUTE_CAP"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var("NVCC").map(PathBuf::from).unwrap_or_else(|_| match std::env::var("CUDA_ROOT") {
        Ok(root) => PathBuf::from(root).join("bin/nvcc"),
        Err(_) => PathBuf::from("nvcc"),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo")).join("ragnode.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "cuda/ragnode.cu", "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} failed on cuda/ragnode.cu ({s})", nvcc.display()),
        Err(e) => panic!("cannot run {} ({e}); run scripts/cuda-toolchain.sh or set NVCC", nvcc.display()),
    }
}
