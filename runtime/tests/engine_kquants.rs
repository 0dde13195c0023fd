//! Q4_K and Q6_K dequantization against gguf-py's dequantizer on random
//! blocks (`scripts/reference/kquants_ref.py` wrote the golden file), and a
//! K-quant matrix product against the product with its dequantized rows.

use std::sync::Arc;

use serde_json::Value;
use xpyd_runtime::engine::cpu::{QMatrix, WeightBytes};
use xpyd_runtime::engine::gguf::GgmlType;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn k_quants_dequantize_like_ggml() {
    let golden: Value = serde_json::from_str(include_str!("data/kquants.json")).unwrap();
    for (key, ty) in [("q4_k", GgmlType::Q4K), ("q6_k", GgmlType::Q6K)] {
        let bytes = hex(golden[key]["bytes_hex"].as_str().unwrap());
        let want: Vec<f32> = golden[key]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        // Two super-blocks as one row of 512, and as two rows of 256.
        for (rows, cols) in [(1, 512), (2, 256)] {
            let m = QMatrix::new(
                key,
                ty,
                rows,
                cols,
                WeightBytes::Owned(Arc::new(bytes.clone())),
            )
            .unwrap();
            let mut got = vec![0f32; rows * cols];
            for (r, out) in got.chunks_exact_mut(cols).enumerate() {
                m.dequantize_row(r, out);
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                    "{key}: value {i}: engine {g}, gguf-py {w}"
                );
            }
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6)
                .collect();
            let mut y = vec![0f32; rows];
            m.matmul(&x, 1, &mut y);
            for (r, &v) in y.iter().enumerate() {
                let exact: f32 = want[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| a * b)
                    .sum();
                assert!(
                    (v - exact).abs() < 1e-3 * (1.0 + exact.abs()),
                    "{key}: row {r}: {v} vs {exact}"
                );
            }
        }
    }
}
