//! The concepts of a session, found by their `<name>` in prompts, whatever their method.

use std::collections::BTreeMap;
use std::path::Path;

use super::prompt::{parse_prompt, ParsedPrompt};
use crate::error::{Error, Result};
use crate::infusion::concept::Concept;
use crate::job::Job;
use crate::methods::{ConceptRef, ConceptRequest};
use crate::sd::pipeline::StableDiffusion;

/// The concepts of a session, by name: a name belongs to one concept.
#[derive(Debug, Clone, Default)]
pub struct ConceptSet {
    concepts: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    concept: ConceptRef,
    /// Used even when trained on another model.
    forced: bool,
}

impl ConceptSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a concept; `forced`: use it even on a model it was not trained on.
    /// Returns the one it replaced.
    pub fn insert(&mut self, concept: impl Into<ConceptRef>, forced: bool) -> Option<ConceptRef> {
        let concept = concept.into();
        self.concepts
            .insert(concept.name().to_string(), Entry { concept, forced })
            .map(|e| e.concept)
    }

    /// Adds a concept of the session; one of the same name is replaced, and `job` says so.
    pub fn add(&mut self, concept: impl Into<ConceptRef>, forced: bool, job: &Job) {
        let concept = concept.into();
        let (name, word) = (concept.name().to_string(), concept.word().to_string());
        if let Some(old) = self.insert(concept, forced) {
            job.warn(format!(
                "<{name}> ({word}) replaces the concept of that name loaded before ({})",
                old.word()
            ));
        }
    }

    pub fn get(&self, name: &str) -> Option<&ConceptRef> {
        self.concepts.get(name).map(|e| &e.concept)
    }

    /// The Infusion concept called `name`, if it is one.
    pub fn infusion(&self, name: &str) -> Option<&Concept> {
        self.get(name)
            .and_then(|c| c.as_any().downcast_ref::<Concept>())
    }

    /// Removes the concept `name`; true if there was one.
    pub fn forget(&mut self, name: &str) -> bool {
        self.concepts.remove(name).is_some()
    }

    /// Every concept, by name.
    pub fn iter(&self) -> impl Iterator<Item = &ConceptRef> {
        self.concepts.values().map(|e| &e.concept)
    }

    pub fn len(&self) -> usize {
        self.concepts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.concepts.is_empty()
    }

    /// Reads a concept file or folder of any method (see [`crate::methods::load`]), checked
    /// against `sd` when given, and adds it.
    pub fn load(
        &mut self,
        req: &ConceptRequest,
        sd: Option<&StableDiffusion>,
        job: &Job,
    ) -> Result<ConceptRef> {
        let concept = crate::methods::load(req, sd, job)?;
        self.add(concept.clone(), req.force, job);
        Ok(concept)
    }

    /// [`ConceptSet::load`] of the file at `path`, as it names itself.
    pub fn load_file(
        &mut self,
        path: &Path,
        sd: Option<&StableDiffusion>,
        force: bool,
        job: &Job,
    ) -> Result<ConceptRef> {
        let req = ConceptRequest {
            path: path.to_path_buf(),
            force,
            ..Default::default()
        };
        self.load(&req, sd, job)
    }

    /// Checks the concept `name` against `sd` (refused on another model unless it was added
    /// forced). Warnings go to `job`.
    pub fn check(&self, name: &str, sd: &StableDiffusion, job: &Job) -> Result<()> {
        match self.concepts.get(name) {
            Some(e) => e.concept.check(sd, e.forced, job),
            None => Err(Error::arg(
                "concept",
                format!("no concept named <{name}> is loaded"),
            )),
        }
    }

    /// Parses `<name>` marks of a prompt against these concepts.
    pub fn parse(&self, prompt: &str) -> Result<ParsedPrompt> {
        parse_prompt(prompt, |n| self.get(n).map(|c| c.word().to_string()))
    }
}
