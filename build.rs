//! With the `cuda` feature, compiles the crate's own CUDA kernels (src/sd/fused/*.cu) to PTX with
//! nvcc, as candle-kernels does; the PTX is embedded and JIT-compiled by the driver on first use.
//! `compute_80` PTX runs on every GPU with tensor-core WMMA for f16 and bf16 (A100, H100, H200).
//! Without the feature nothing is compiled and no CUDA toolkit is needed.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["attention", "group_norm"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CUDA_HOME")
                .map(|home| PathBuf::from(home).join("bin/nvcc"))
                .filter(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    for name in KERNELS {
        let src = format!("src/sd/fused/{name}.cu");
        println!("cargo::rerun-if-changed={src}");
        let ptx = out_dir.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-arch=compute_80", "-O3", "-std=c++17", "-o"])
            .arg(&ptx)
            .arg(&src)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{} failed on {src} ({s})", nvcc.display()),
            Err(e) => panic!(
                "cannot run {} to compile {src}: {e} (the `cuda` feature needs nvcc: set \
                 CUDA_HOME or NVCC, or build with tools/cuda-build.sh)",
                nvcc.display()
            ),
        }
    }
}
