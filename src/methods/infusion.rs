//! Infusion, the paper's method, behind the method seam: its mechanics (concepts, the hook in
//! which C uses F's attention maps and adds the Δs, training, attention maps) live in
//! [`crate::infusion`]; this file says what the seam asks.

use std::any::Any;
use std::sync::Arc;

use candle_core::DType;

use super::files::{Found, Provenance};
use super::{Change, ConceptRef, ConceptRequest, CustomConcept, Method, Settings};
use crate::error::Result;
use crate::infusion::concept::Concept;
use crate::job::Job;
use crate::sd::pipeline::StableDiffusion;
use crate::train::{Learner, Trainer};

/// The method.
pub struct Infusion;

impl Method for Infusion {
    fn name(&self) -> &'static str {
        "infusion"
    }

    fn about(&self) -> &'static str {
        "the paper's: one residual per cross-attention layer on the concept word's values, with \
         F's attention maps in C"
    }

    /// The paper's.
    fn default_steps(&self) -> usize {
        500
    }

    /// The paper's AdamW learning rate.
    fn default_lr(&self, _: usize, _: bool) -> f64 {
        0.01
    }

    fn learner<'a>(
        &self,
        sd: &'a StableDiffusion,
        _: &Settings,
        _: &str,
        _: u64,
    ) -> Result<Box<dyn Learner + 'a>> {
        Ok(Box::new(crate::infusion::train::Deltas::new(sd)?))
    }

    fn reached(&self, trainer: &Trainer<'_>, _: &Settings) -> Result<ConceptRef> {
        Ok(Arc::new(crate::infusion::train::concept(trainer)?))
    }

    fn claims(&self, found: &Found) -> bool {
        found
            .meta("format")
            .is_some_and(|f| f.starts_with("infusion-concept"))
    }

    /// Our `infusion-concept/1` file (a name given calls it by that name); one trained on
    /// another model is refused unless forced.
    fn load(
        &self,
        found: &Found,
        req: &ConceptRequest,
        sd: Option<&StableDiffusion>,
        job: &Job,
    ) -> Result<ConceptRef> {
        req.refuse_others(self.name(), &[])?;
        let Found::File { data, path, .. } = found else {
            return Err(found.unclaimed());
        };
        let mut concept = Concept::from_bytes(data, path)?;
        if let Some(name) = &req.name {
            crate::util::names::check_name(name)?;
            concept.name = name.clone();
        }
        if let Some(sd) = sd {
            concept
                .check(sd, req.force, job)
                .map_err(|e| super::common::in_file(e, path))?;
        }
        Ok(Arc::new(concept))
    }
}

impl CustomConcept for Concept {
    fn name(&self) -> &str {
        &self.name
    }

    fn word(&self) -> &str {
        &self.word
    }

    fn method(&self) -> &'static str {
        "infusion"
    }

    fn size_bytes(&self) -> usize {
        self.n_values() * 4
    }

    fn summary(&self) -> String {
        format!(
            "Concept(<{}> = {}, infusion, {} layers, {} values)",
            self.name,
            self.word,
            self.deltas.len(),
            self.n_values()
        )
    }

    fn provenance(&self) -> Provenance {
        Provenance {
            method: Some(self.method().into()),
            name: Some(self.name.clone()),
            word: Some(self.word.clone()),
            trigger: None,
            rank: None,
            base_model: self.base_model.clone(),
            train_steps: self.train["steps"].as_u64().map(|s| s as usize),
        }
    }

    /// `infusion-concept/1`, f16 unless `f32`.
    fn save(&self, path: &std::path::Path, f32: bool) -> Result<()> {
        Concept::save(self, path, if f32 { DType::F32 } else { DType::F16 })
    }

    fn check(&self, sd: &StableDiffusion, forced: bool, job: &Job) -> Result<()> {
        crate::infusion::concept::check(self, sd, forced, job)
    }

    fn renamed(&self, name: &str) -> ConceptRef {
        Arc::new(Concept {
            name: name.to_string(),
            ..self.clone()
        })
    }

    fn change(&self) -> Change<'_> {
        Change {
            words: vec![],
            residuals: Some(&self.deltas),
            hooks: None,
            unet: None,
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl From<Concept> for ConceptRef {
    fn from(c: Concept) -> Self {
        Arc::new(c)
    }
}
