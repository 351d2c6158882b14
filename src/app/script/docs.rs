//! `:help` texts: signature, one paragraph, an example, for every bound function.

/// The documentation of one bound function (all its overloads).
#[derive(Debug, Clone, Copy)]
pub struct FnDoc {
    pub name: &'static str,
    pub signatures: &'static [&'static str],
    pub doc: &'static str,
    pub example: &'static str,
}

pub const FUNCTIONS: &[FnDoc] = &[
    FnDoc {
        name: "load_model",
        signatures: &["load_model() -> Model", "load_model(path_or_repo_id) -> Model", "load_model(path, #{device, dtype}) -> Model"],
        doc: "Loads a Stable Diffusion 1.x model from a diffusers folder or a repo id in the Hugging Face cache (nothing is downloaded). Without an argument: the --model given on the command line, else the bundled tiny model. device is \"cpu\", \"cuda\" or \"cuda:N\"; dtype \"f32\", \"f16\" or \"bf16\". Concepts loaded afterwards are checked against this model.",
        example: "let m = load_model(\"stable-diffusion-v1-5/stable-diffusion-v1-5\", #{device: \"cuda\", dtype: \"f16\"});",
    },
    FnDoc {
        name: "set_kernels",
        signatures: &["set_kernels(name)"],
        doc: "Chooses the kernels from now on in this session, for every model: \"naive\" (candle's composite ops; the default) or \"fused\" (attention without a score matrix in memory, group norm + SiLU in one pass: CUDA kernels in f16/bf16, plain loops on the CPU). Layers whose maps are captured and layers that training differentiates through stay naive. Same as --kernels on the command line.",
        example: "set_kernels(\"fused\"); let g = m.generate(\"a cat\", #{maps: false});",
    },
    FnDoc {
        name: "kernels",
        signatures: &["kernels() -> string"],
        doc: "The kernels in use: \"naive\" or \"fused\" (see set_kernels).",
        example: "print(kernels());",
    },
    FnDoc {
        name: "generate",
        signatures: &["model.generate(prompt) -> Generation", "model.generate(prompt, #{seed, steps, guidance, negative, width, height, noise, replace_steps, maps}) -> Generation"],
        doc: "Generates the base image (plain SD) and the customized image (Infusion) from the same noise. <name> in the prompt marks a loaded concept. Defaults: seed 0, 50 DDIM steps, guidance 8, the model's size. noise is a safetensors file whose tensor `noise` is the initial latent; replace_steps the fraction of steps in which C uses F's attention maps; maps \"light\" (default: 16x16 maps, averaged), \"all\" (every layer and step) or false. Ctrl-C cancels.",
        example: "let g = m.generate(\"a <mycat> reading a book\", #{seed: 7, steps: 30}); show(hstack([g.base, g.custom]));",
    },
    FnDoc {
        name: "attention",
        signatures: &["generation.attention(word) -> Image", "generation.attention(word, #{stream, layer, step, resolution}) -> Image"],
        doc: "The heat map of a word's cross-attention over the image: F's and C's side by side, or one stream (\"F\" or \"C\"). Averaged over heads, steps and the layers of one resolution (the 16x16 ones by default); with layer (a weight path) one layer, with step one step (generate with #{maps: \"all\"} for those). A concept is named as \"<mycat>\".",
        example: "show(g.attention(\"<mycat>\")); show(g.attention(\"book\", #{stream: \"C\"}));",
    },
    FnDoc {
        name: "attention_tiles",
        signatures: &["generation.attention_tiles() -> Image", "generation.attention_tiles(stream) -> Image"],
        doc: "One heat-map tile per prompt token, with the token written under it, for C (default) or F.",
        example: "show(g.attention_tiles(\"F\"));",
    },
    FnDoc {
        name: "save_maps",
        signatures: &["generation.save_maps(path)"],
        doc: "Writes the captured attention maps as safetensors: F/<layer> and C/<layer> (mean over steps, shape [h, w, tokens]) and F/<layer>/step<i> for kept steps.",
        example: "g.save_maps(\"maps.safetensors\");",
    },
    FnDoc {
        name: "train_concept",
        signatures: &["model.train_concept(folder, name, word) -> Concept", "model.train_concept(folder, name, word, #{steps, lr, batch, seed, templates, checkpoint_every, checkpoint_dir, flip}) -> Concept"],
        doc: "Trains a concept from a folder of 3-20 images: its name (prompts say <name>) and its class word. AdamW on the residuals only (lr 0.01, batch 4, 500 steps by default). templates are prompts with {} for the word. Ctrl-C stops and keeps the residuals reached; the concept joins the session either way.",
        example: "let cat = m.train_concept(\"photos/mycat\", \"mycat\", \"cat\", #{steps: 400}); cat.save(\"mycat.safetensors\");",
    },
    FnDoc {
        name: "default_templates",
        signatures: &["default_templates() -> array of string"],
        doc: "The prompt templates train_concept uses when none are given ({} stands for the class word), after textual inversion's list. The stdlib's prompts::TEMPLATES.",
        example: "let t = default_templates(); print(t[0]);",
    },
    FnDoc {
        name: "load_concept",
        signatures: &["load_concept(path) -> Concept", "load_concept(path, #{force: true}) -> Concept"],
        doc: "Loads a concept file (infusion-concept/1) into the session. A concept trained on another model is refused unless force is true.",
        example: "load_concept(\"mycat.safetensors\"); load_concept(\"teapot.safetensors\");",
    },
    FnDoc {
        name: "concepts",
        signatures: &["concepts() -> array of Concept"],
        doc: "The concepts of this session.",
        example: "for c in concepts() { print(c); }",
    },
    FnDoc {
        name: "forget_concept",
        signatures: &["forget_concept(name) -> bool"],
        doc: "Removes a concept from the session; true if there was one.",
        example: "forget_concept(\"mycat\");",
    },
    FnDoc {
        name: "tokens",
        signatures: &["model.tokens(prompt) -> array of #{id, text, position}"],
        doc: "How a prompt tokenizes (concept marks replaced by their words), start and end tokens included.",
        example: "for t in m.tokens(\"a <mycat> on a mat\") { print(t); }",
    },
    FnDoc {
        name: "token_ids",
        signatures: &["model.token_ids(prompt) -> array of int"],
        doc: "The padded token ids the text encoder gets.",
        example: "print(m.token_ids(\"a photo of a cat\").len());",
    },
    FnDoc {
        name: "show",
        signatures: &["show(image)"],
        doc: "Draws an image in the terminal (kitty, iTerm or sixel graphics where available, half blocks otherwise). When output is not a terminal or --no-images is set, saves it under infusion-out/ and prints the path.",
        example: "show(g.custom);",
    },
    FnDoc {
        name: "save",
        signatures: &["image.save(path) -> path", "generation.save(path) -> [paths]", "concept.save(path) -> path", "concept.save(path, #{dtype: \"f32\"}) -> path"],
        doc: "Writes a file atomically: an image as PNG (with prompt, seed, steps and concepts in text chunks); a generation as base|custom side by side plus each alone; a concept as safetensors (f16 unless dtype says f32).",
        example: "g.custom.save(\"cat.png\");",
    },
    FnDoc {
        name: "hstack",
        signatures: &["hstack(images) -> Image"],
        doc: "Images side by side.",
        example: "show(hstack([g.base, g.custom]));",
    },
    FnDoc {
        name: "grid",
        signatures: &["grid(images, cols) -> Image"],
        doc: "Images in rows of cols.",
        example: "show(grid(images, 4));",
    },
    FnDoc {
        name: "resize",
        signatures: &["image.resize(width, height) -> Image"],
        doc: "A resized copy (Catmull-Rom).",
        example: "show(g.custom.resize(128, 128));",
    },
    FnDoc {
        name: "load_image",
        signatures: &["load_image(path) -> Image"],
        doc: "Reads an image file (png, jpg, webp) as RGB.",
        example: "let ref = load_image(\"photos/mycat/1.jpg\");",
    },
    FnDoc {
        name: "load_tensors",
        signatures: &["load_tensors(path) -> map of Tensor"],
        doc: "Reads every tensor of a safetensors file. Tensors have .shape, .dtype, .mean(), .min(), .max(), .to_array().",
        example: "let t = load_tensors(\"maps.safetensors\"); print(t.keys());",
    },
    FnDoc {
        name: "save_tensors",
        signatures: &["save_tensors(map, path)"],
        doc: "Writes a map of tensors as safetensors (e.g. latents for another tool).",
        example: "save_tensors(#{noise: g.base_latents}, \"latents.safetensors\");",
    },
    FnDoc {
        name: "mean",
        signatures: &["tensor.mean() -> float"],
        doc: "The mean of every value of a tensor.",
        example: "print(g.custom_latents.mean());",
    },
    FnDoc {
        name: "min",
        signatures: &["tensor.min() -> float"],
        doc: "The smallest value of a tensor.",
        example: "print(g.custom_latents.min());",
    },
    FnDoc {
        name: "max",
        signatures: &["tensor.max() -> float"],
        doc: "The largest value of a tensor.",
        example: "print(g.custom_latents.max());",
    },
    FnDoc {
        name: "to_array",
        signatures: &["tensor.to_array() -> array of float"],
        doc: "Every value of a tensor, flattened, as floats (small tensors: a concept's layer, a map's corner).",
        example: "let v = load_tensors(\"mycat.safetensors\")[\"mid_block.attentions.0.transformer_blocks.0.attn2\"].to_array();",
    },
    FnDoc {
        name: "fisher_divergence",
        signatures: &["fisher_divergence(model, other, prompts) -> #{mean, std_err, samples}", "fisher_divergence(model, other, prompts, #{samples, seed, batch, images, gen_steps}) -> map"],
        doc: "Latent Fisher divergence (concept-agnostic overfitting, the paper's Definition 3.1): 1/2 times the mean over prompts, latents, uniform timesteps and noise of ||eps_a - eps_b||^2 between the model and a variant: other is a concept or an array of concepts (applied to the prompts' <name> marks), another model (its UNet), or a UNet weight file. Latents come from the images folder when given, else from the model's own generations (gen_steps). Deterministic for a seed. Prompts without marks give exactly 0 for concepts.",
        example: "let f = fisher_divergence(m, [cat], [\"a photo of a dog\", \"a <mycat> on a sofa\"], #{samples: 64}); print(f.mean);",
    },
    FnDoc {
        name: "wasserstein",
        signatures: &["wasserstein(latents_a, latents_b) -> float", "wasserstein(latents_a, latents_b, #{pool}) -> float"],
        doc: "The 2-Wasserstein (Frechet) distance between Gaussians fitted to two sets of samples (tensors [n, ...] or arrays of tensors), with unbiased covariances as FID, computed exactly in f64 without d x d matrices. pool average-pools [n, C, H, W] latents first.",
        example: "let w = wasserstein(base_latents, custom_latents);",
    },
    FnDoc {
        name: "wasserstein2",
        signatures: &["wasserstein2(latents_a, latents_b) -> float", "wasserstein2(latents_a, latents_b, #{pool}) -> float"],
        doc: "The squared 2-Wasserstein distance (see wasserstein).",
        example: "print(wasserstein2(a, b));",
    },
    FnDoc {
        name: "load_clip",
        signatures: &["load_clip() -> Clip", "load_clip(path) -> Clip"],
        doc: "Loads a CLIP checkpoint folder in the Hugging Face layout (e.g. openai/clip-vit-base-patch32); without a path, the bundled tiny random one. Its preprocessing follows its preprocessor_config.json exactly (Pillow's bicubic resize, centre crop).",
        example: "let clip = load_clip(\"models/clip-vit-base-patch32\");",
    },
    FnDoc {
        name: "load_dino",
        signatures: &["load_dino() -> Dino", "load_dino(path) -> Dino"],
        doc: "Loads a DINO ViT checkpoint folder (e.g. facebook/dino-vits16); without a path, the bundled tiny random one.",
        example: "let dino = load_dino(\"models/dino-vits16\");",
    },
    FnDoc {
        name: "image_embeds",
        signatures: &["clip.image_embeds(images) -> Tensor"],
        doc: "CLIP image embeddings [n, projection], of an array of images or a folder.",
        example: "let e = clip.image_embeds([g.custom]);",
    },
    FnDoc {
        name: "text_embeds",
        signatures: &["clip.text_embeds(prompts) -> Tensor"],
        doc: "CLIP text embeddings [n, projection] of a prompt or an array of prompts.",
        example: "let t = clip.text_embeds([\"a photo of a cat\"]);",
    },
    FnDoc {
        name: "embeds",
        signatures: &["dino.embeds(images) -> Tensor"],
        doc: "DINO embeddings (the CLS token) [n, hidden], of an array of images or a folder.",
        example: "let e = dino.embeds(\"photos/mycat\");",
    },
    FnDoc {
        name: "clip_t",
        signatures: &["clip_t(clip, images, prompts) -> float"],
        doc: "CLIP-T: the mean cosine between each image and its prompt (one prompt for all, or one per image). Pass prompts as the base model sees them (g.base_prompt), without <> marks.",
        example: "print(clip_t(clip, [g.custom], [g.base_prompt]));",
    },
    FnDoc {
        name: "clip_i",
        signatures: &["clip_i(clip, images, references) -> float"],
        doc: "CLIP-I: the mean cosine between generated images and the concept's training images (an array or a folder).",
        example: "print(clip_i(clip, [g.custom], \"photos/mycat\"));",
    },
    FnDoc {
        name: "dino_i",
        signatures: &["dino_i(dino, images, references) -> float"],
        doc: "DINO-I: the mean cosine of DINO embeddings between generated images and the training images.",
        example: "print(dino_i(dino, [g.custom], \"photos/mycat\"));",
    },
    FnDoc {
        name: "evaluate",
        signatures: &["model.evaluate(#{concepts: [#{file, images}], prompts, n, steps, guidance, seed, out, clip, dino, force}) -> #{csv, table, markdown, images}"],
        doc: "The paper's evaluation: every concept x every prompt ({} = the concept) x n images, scored with CLIP-T, CLIP-I and DINO-I, written to OUT/scores.csv (per image) and OUT/table.md (per concept, with its storage). Resumable: run it again after an interruption and it skips what is done.",
        example: "let r = m.evaluate(#{concepts: [#{file: \"pot.safetensors\", images: \"photos/pot\"}], prompts: [\"a {} in the snow\"], n: 4}); print(r.markdown);",
    },
    FnDoc {
        name: "overtraining_curves",
        signatures: &["model.overtraining_curves(folder, name, word) -> #{csv, chart, chart_path, points}", "model.overtraining_curves(folder, name, word, #{checkpoints, lr, batch, seed, fisher_prompts, fisher_samples, w2_samples, w2_pool, prompts, n, steps, guidance, out, clip, dino}) -> map"],
        doc: "Trains a concept and measures, at each checkpoint step, the latent Fisher divergence, W2 between base and customized latents, CLIP-T, CLIP-I and DINO-I (the paper's figures 10 and 11); writes a CSV and a chart (chart is an image to show).",
        example: "let c = m.overtraining_curves(\"photos/pot\", \"pot\", \"teapot\", #{checkpoints: [100, 200, 400]}); show(c.chart);",
    },
    FnDoc {
        name: "device_info",
        signatures: &["device_info() -> map"],
        doc: "The default device and dtype, whether CUDA is compiled in and available, CPU threads, the loaded model.",
        example: "print(device_info());",
    },
    FnDoc {
        name: "memory_info",
        signatures: &["memory_info() -> map"],
        doc: "Memory in use: the process's resident bytes.",
        example: "print(memory_info());",
    },
];

/// The documentation of `name`.
pub fn find(name: &str) -> Option<&'static FnDoc> {
    FUNCTIONS.iter().find(|d| d.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::script::{build_engine, ScriptConfig, Session};

    /// Every function a script can call has a :help entry, and every entry is a function.
    #[test]
    fn every_bound_function_is_documented() {
        let engine = build_engine(&Session::new(ScriptConfig::default()));
        let mut names: Vec<String> = engine
            .gen_fn_signatures(false)
            .into_iter()
            .filter_map(|s| {
                s.split('(')
                    .next()
                    .map(|n| n.rsplit(' ').next().unwrap_or(n).to_string())
            })
            .filter(|n| {
                !n.starts_with("get$")
                    && !n.starts_with("set$")
                    && n != "to_string"
                    && n != "to_debug"
            })
            .collect();
        names.sort();
        names.dedup();
        for n in &names {
            assert!(find(n).is_some(), "`{n}` has no :help entry");
        }
        for d in FUNCTIONS {
            assert!(
                names.iter().any(|n| n == d.name),
                "`{}` is documented but not bound",
                d.name
            );
            assert!(!d.doc.is_empty() && !d.example.is_empty() && !d.signatures.is_empty());
        }
    }
}
