//! The concepts of a session, found by their `<name>` in prompts, whatever their method.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::prompt::{parse_prompt, ParsedPrompt};
use crate::error::{Error, Result};
use crate::infusion::concept::{check, Concept};
use crate::job::Job;
use crate::methods::adapted::Adapted;
use crate::sd::pipeline::StableDiffusion;

/// The concepts of a session, found by name: Infusion's, and those of the other methods
/// ([`Adapted`]: a learned word, a LoRA). A name belongs to one of them.
#[derive(Debug, Clone, Default)]
pub struct ConceptSet {
    concepts: BTreeMap<String, Entry>,
    adapted: BTreeMap<String, Arc<Adapted>>,
}

#[derive(Debug, Clone)]
struct Entry {
    concept: Arc<Concept>,
    /// Used even when trained on another model.
    forced: bool,
}

impl ConceptSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a concept; `forced`: use it even on a model it was not trained on.
    /// Returns the one it replaced.
    pub fn insert(&mut self, concept: Concept, forced: bool) -> Option<Arc<Concept>> {
        self.insert_arc(Arc::new(concept), forced)
    }

    fn insert_arc(&mut self, concept: Arc<Concept>, forced: bool) -> Option<Arc<Concept>> {
        self.adapted.remove(&concept.name);
        self.concepts
            .insert(concept.name.clone(), Entry { concept, forced })
            .map(|e| e.concept)
    }

    /// Adds a concept of the session; one of the same name is replaced, and `job` says so.
    pub fn add(&mut self, concept: Arc<Concept>, forced: bool, job: &Job) {
        let (name, word) = (concept.name.clone(), concept.word.clone());
        if let Some(old) = self.insert_arc(concept, forced) {
            job.warn(format!(
                "<{name}> ({word}) replaces the concept of that name loaded before ({})",
                old.word
            ));
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Concept>> {
        self.concepts.get(name).map(|e| &e.concept)
    }

    /// Adds (or replaces) a concept of another method; one of the same name is replaced, and
    /// `job` says so.
    pub fn add_adapted(&mut self, concept: Arc<Adapted>, job: &Job) {
        let name = concept.name.clone();
        let old = self
            .concepts
            .remove(&name)
            .map(|e| e.concept.word.clone())
            .or_else(|| self.adapted.get(&name).map(|a| a.word.clone()));
        if let Some(old) = old {
            job.warn(format!(
                "<{name}> ({}) replaces the concept of that name loaded before ({old})",
                concept.word
            ));
        }
        self.adapted.insert(name, concept);
    }

    /// The concept of another method called `name`.
    pub fn get_adapted(&self, name: &str) -> Option<&Arc<Adapted>> {
        self.adapted.get(name)
    }

    /// The concepts of the other methods.
    pub fn adapted(&self) -> impl Iterator<Item = &Arc<Adapted>> {
        self.adapted.values()
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<Concept>> {
        self.concepts.remove(name).map(|e| e.concept)
    }

    /// Removes the concept `name` of whichever method; true if there was one.
    pub fn forget(&mut self, name: &str) -> bool {
        self.concepts.remove(name).is_some() | self.adapted.remove(name).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Concept>> {
        self.concepts.values().map(|e| &e.concept)
    }

    pub fn len(&self) -> usize {
        self.concepts.len() + self.adapted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.concepts.is_empty() && self.adapted.is_empty()
    }

    /// Reads a concept file and adds it. With a model, checks it against the model first (see
    /// [`ConceptSet::check`]); `force` accepts a concept trained on another model.
    pub fn load_file(
        &mut self,
        path: &Path,
        sd: Option<&StableDiffusion>,
        force: bool,
        job: &Job,
    ) -> Result<Arc<Concept>> {
        self.load_file_named(path, None, sd, force, job)
    }

    /// [`ConceptSet::load_file`], called `name` in prompts instead of the name it carries.
    pub fn load_file_named(
        &mut self,
        path: &Path,
        name: Option<&str>,
        sd: Option<&StableDiffusion>,
        force: bool,
        job: &Job,
    ) -> Result<Arc<Concept>> {
        let mut concept = Concept::load(path)?;
        if let Some(name) = name {
            crate::util::names::check_name(name)?;
            concept.name = name.to_string();
        }
        let concept = Arc::new(concept);
        if let Some(sd) = sd {
            check(&concept, sd, force, job).map_err(|e| match e {
                Error::InvalidArgument { msg, .. } => Error::Config {
                    path: path.to_path_buf(),
                    msg,
                },
                e => e,
            })?;
        }
        self.add(concept.clone(), force, job);
        Ok(concept)
    }

    /// Checks the concept `name` against `sd`: every cross-attention layer present with its
    /// width, and the base model (refused unless it was added forced). Warnings go to `job`.
    pub fn check(&self, name: &str, sd: &StableDiffusion, job: &Job) -> Result<()> {
        match self.concepts.get(name) {
            Some(e) => check(&e.concept, sd, e.forced, job),
            None => Err(Error::arg(
                "concept",
                format!("no concept named <{name}> is loaded"),
            )),
        }
    }

    /// Parses `<name>` marks of a prompt against these concepts.
    pub fn parse(&self, prompt: &str) -> Result<ParsedPrompt> {
        parse_prompt(prompt, |n| {
            self.get(n)
                .map(|c| c.word.clone())
                .or_else(|| self.get_adapted(n).map(|a| a.word.clone()))
        })
    }
}
