//! Checks that need a CUDA GPU. On a machine without one every test prints
//! why it skipped and passes; on the GPU machine run
//! `cargo test -p xpyd-runtime --features cuda --test cuda_gpu -- --nocapture`
//! (after `scripts/setup`, with cuBLAS 13 on the loader path).

use xpyd_runtime::engine::device::{self, CudaDevice, DeviceChoice, ResolvedDevice};

/// The first GPU, or `None` after printing why there is none.
fn gpu() -> Option<CudaDevice> {
    match device::resolve(DeviceChoice::Cuda { ordinal: 0 }) {
        Ok(ResolvedDevice::Cuda(d)) => Some(d),
        Ok(other) => panic!("--device cuda resolved to {other:?}"),
        Err(e) => {
            eprintln!("skipped: no usable CUDA GPU here: {e}");
            None
        }
    }
}

#[test]
fn device_cuda_resolves_to_the_gpu_and_auto_agrees() {
    let Some(dev) = gpu() else { return };
    eprintln!(
        "{} ({}), {} GiB",
        dev.name,
        dev.compute_capability,
        dev.total_memory_bytes >> 30
    );
    assert_eq!(
        device::resolve(DeviceChoice::Auto).unwrap(),
        ResolvedDevice::Cuda(dev)
    );
}

#[cfg(feature = "cuda")]
mod model {
    use super::gpu;
    use xpyd_runtime::assets;
    use xpyd_runtime::engine::cuda::backend::CudaBackend;
    use xpyd_runtime::engine::cuda::model::{CudaKvCache, CudaModel};
    use xpyd_runtime::engine::kv_storage::KvStorage;
    use xpyd_runtime::engine::model::{LogitsFor, Model, SequenceInput, argmax};

    /// "The capital of France is" (see shared FACTS).
    const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];

    #[test]
    fn every_kernel_loads_on_the_device() {
        let Some(dev) = gpu() else { return };
        CudaBackend::new(dev).expect("kernels compile and load");
    }

    /// Prefill in two chunks then greedy decode, on the GPU and the CPU:
    /// the same tokens, and logits within a tolerance (bf16 weights and
    /// activations on the GPU, Q8 activations on the CPU).
    #[test]
    fn smollm2_matches_the_cpu_model() {
        let Some(dev) = gpu() else { return };
        let path = assets::bundled_model().expect("run scripts/setup");
        let cpu = Model::load_gguf(&path).unwrap();
        let gpu = CudaModel::load_gguf(CudaBackend::new(dev).unwrap(), &path).unwrap();
        let (blocks, bs) = (8, 4);
        let table: Vec<u32> = (0..blocks as u32).rev().collect();
        let mut kv_cpu = KvStorage::new(cpu.kv_shape(blocks, bs)).unwrap();
        let mut kv_gpu = CudaKvCache::new(gpu.backend(), gpu.kv_shape(blocks, bs)).unwrap();

        let mut tokens = PROMPT.to_vec();
        // Chunked prefill: 3 tokens, then 2 after the cached prefix.
        let mut start = 0;
        let mut last = (Vec::new(), Vec::new());
        for chunk in [&PROMPT[..3], &PROMPT[3..]] {
            let seq = [SequenceInput {
                tokens: chunk,
                start_pos: start,
                block_table: &table,
            }];
            let c = cpu
                .forward(&mut kv_cpu, &seq, LogitsFor::LastToken)
                .unwrap();
            let g = gpu
                .forward(&mut kv_gpu, &seq, LogitsFor::LastToken)
                .unwrap();
            last = (c[0].clone(), g[0].clone());
            start += chunk.len();
        }
        for step in 0..2 {
            let (c, g) = &last;
            let diff = c
                .iter()
                .zip(g)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let (tc, tg) = (argmax(c).unwrap() as u32, argmax(g).unwrap() as u32);
            eprintln!("step {step}: cpu {tc}, gpu {tg}, max |logit diff| {diff:.3}");
            assert!(diff < 1.0, "step {step}: logits differ by {diff}");
            assert_eq!(tc, tg, "step {step}");
            tokens.push(tc);
            let seq = [SequenceInput {
                tokens: &tokens[tokens.len() - 1..],
                start_pos: tokens.len() - 1,
                block_table: &table,
            }];
            let c = cpu
                .forward(&mut kv_cpu, &seq, LogitsFor::LastToken)
                .unwrap();
            let g = gpu
                .forward(&mut kv_gpu, &seq, LogitsFor::LastToken)
                .unwrap();
            last = (c[0].clone(), g[0].clone());
        }
    }
}
