//! The batched model (dynamic batch, one style per sample; models/tools/make_batched_multistyle26.py)
//! computes what the upstream model computes, sample by sample, through the same ONNX Runtime.

use ort::session::Session;
use ort::value::TensorRef;

use crate::helpers::repo;

fn session(env: &ort::environment::Environment, file: &str) -> Session {
    Session::builder(env)
        .unwrap()
        .commit_from_file(repo().join("models/multistyle26").join(file))
        .unwrap()
}

#[test]
fn a_mixed_style_batch_matches_the_original_model_run_one_by_one() {
    let env =
        kiln::inference::runtime::environment(&repo().join("runtime/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1"))
            .unwrap();
    let mut original = session(&env, "multistyle26.onnx");
    let mut batched = session(&env, "multistyle26-batched.onnx");

    let (n, h, w) = (3usize, 64usize, 96usize);
    // Deterministic, image-like content; samples 0 and 1 share an image, sample 2 has its own.
    let images: Vec<f32> = (0..n * 3 * h * w)
        .map(|i| {
            let (s, rest) = (i / (3 * h * w), i % (3 * h * w));
            let (c, y, x) = (rest / (h * w), (rest / w) % h, rest % w);
            (0.5 + 0.4 * ((x as f32 * 0.13 + (s / 2) as f32).sin() * (y as f32 * 0.07 + c as f32).cos()))
                .clamp(0.0, 1.0)
        })
        .collect();
    let mut weights = vec![0.0f32; n * 26];
    weights[7] = 1.0; // sample 0: style 7
    weights[26 + 19] = 1.0; // sample 1: style 19
    weights[52 + 3] = 0.5; // sample 2: half 3, half 12
    weights[52 + 12] = 0.5;

    let out = batched
        .run(ort::inputs![
            "image" => TensorRef::from_array_view(([n, 3, h, w], images.as_slice())).unwrap(),
            "style_weights" => TensorRef::from_array_view(([n, 26], weights.as_slice())).unwrap(),
        ])
        .unwrap();
    let (shape, batch_out) = out["stylized"].try_extract_tensor::<f32>().unwrap();
    assert_eq!(&**shape, &[n as i64, 3, h as i64, w as i64]);
    let batch_out = batch_out.to_vec();
    drop(out);

    let sample = 3 * h * w;
    for s in 0..n {
        let single = original
            .run(ort::inputs![
                "image" => TensorRef::from_array_view(([1, 3, h, w], &images[s * sample..(s + 1) * sample])).unwrap(),
                "style_weights" => TensorRef::from_array_view(([26usize], &weights[s * 26..(s + 1) * 26])).unwrap(),
            ])
            .unwrap();
        let (_, want) = single["stylized"].try_extract_tensor::<f32>().unwrap();
        let max = want
            .iter()
            .zip(&batch_out[s * sample..])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max < 1e-4, "sample {s}: max difference {max}");
    }
    // The samples really are different styles, not one style repeated.
    let d01 = batch_out[..sample]
        .iter()
        .zip(&batch_out[sample..2 * sample])
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / sample as f32;
    assert!(d01 > 0.05, "styles 7 and 19 look alike ({d01})");
}
