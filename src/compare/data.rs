//! What a comparison trains on: one concept folder (with its name and class word), or a
//! dataset in the DreamBooth dataset's layout (google/dreambooth: one folder of images per
//! subject and `prompts_and_classes.txt`, whose `subject_name,class` lines name each subject's
//! class); and the prompts each is measured with, DreamBooth's 25 (objects or live subjects by
//! class).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::util::names::{check_name, check_word};

/// One concept of a comparison.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Subject {
    /// What prompts call it (`<name>`), and its folder's name in a dataset.
    pub name: String,
    /// Its class word.
    pub word: String,
    pub folder: PathBuf,
}

/// The classes whose subjects take the live-subject prompts (the DreamBooth dataset's cats and
/// dogs); every other class takes the object prompts.
pub const LIVE_CLASSES: [&str; 2] = ["cat", "dog"];

/// DreamBooth's object prompts (Ruiz et al. 2023, its dataset's `prompts_and_classes.txt`), `{}`
/// for the concept.
pub const OBJECT_PROMPTS: [&str; 25] = [
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
];

/// DreamBooth's live-subject prompts.
pub const LIVE_PROMPTS: [&str; 25] = [
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
];

/// The prompts a subject of class `word` is measured with.
pub fn prompts_for(word: &str) -> &'static [&'static str] {
    if LIVE_CLASSES.contains(&word) {
        &LIVE_PROMPTS
    } else {
        &OBJECT_PROMPTS
    }
}

/// The list file of a dataset folder.
pub const CLASS_LIST: &str = "prompts_and_classes.txt";

/// The subjects of `data`: a dataset folder (it holds [`CLASS_LIST`]), each subject a folder
/// named in the list; or one concept folder, named `name` with class `word` (both needed
/// then). Every subject's folder must hold images; a folder of the dataset not in the list, or
/// a subject of the list without its folder, is an error naming it.
pub fn subjects(data: &Path, name: Option<&str>, word: Option<&str>) -> Result<Vec<Subject>> {
    if !data.is_dir() {
        return Err(Error::arg(
            "data",
            format!(
                "{}: not a folder (a concept's images, or a dataset)",
                data.display()
            ),
        ));
    }
    let list = data.join(CLASS_LIST);
    let subjects = if list.is_file() {
        if name.is_some() || word.is_some() {
            return Err(Error::arg(
                "name",
                format!(
                    "{} is a dataset ({CLASS_LIST} names its subjects and classes): no --name / \
                     --word",
                    data.display()
                ),
            ));
        }
        dataset(data, &list)?
    } else {
        let (Some(name), Some(word)) = (name, word) else {
            return Err(Error::arg(
                "word",
                format!(
                    "{} is one concept's folder: give its name and class word (--name, --word), \
                     or a dataset folder with {CLASS_LIST}",
                    data.display()
                ),
            ));
        };
        check_name(name)?;
        check_word(word)?;
        vec![Subject {
            name: name.to_string(),
            word: word.to_string(),
            folder: data.to_path_buf(),
        }]
    };
    for s in &subjects {
        let f = crate::util::image_io::load_folder(&s.folder)
            .map_err(|e| Error::arg("data", format!("subject `{}`: {e}", s.name)))?;
        if f.images.is_empty() {
            return Err(Error::arg(
                "data",
                format!(
                    "subject `{}` ({}) has no images",
                    s.name,
                    s.folder.display()
                ),
            ));
        }
    }
    Ok(subjects)
}

/// The subjects of a dataset's list: the `subject_name,class` lines after that header, up to
/// the first blank line.
fn dataset(data: &Path, list: &Path) -> Result<Vec<Subject>> {
    let text = std::fs::read_to_string(list).map_err(|e| Error::io(list, e))?;
    let bad = |msg: String| Error::Format {
        path: list.to_path_buf(),
        msg,
    };
    let mut lines = text.lines().map(str::trim);
    if !lines.any(|l| l.eq_ignore_ascii_case("subject_name,class")) {
        return Err(bad(
            "no `subject_name,class` header before the subjects".into()
        ));
    }
    let mut out: Vec<Subject> = vec![];
    for l in lines.take_while(|l| !l.is_empty()) {
        let (name, class) = l
            .split_once(',')
            .ok_or_else(|| bad(format!("{l:?} is not `subject_name,class`")))?;
        let (name, class) = (name.trim(), class.trim());
        check_name(name).map_err(|e| bad(format!("subject {name:?}: {e}")))?;
        check_word(class).map_err(|e| bad(format!("the class of `{name}`: {e}")))?;
        if out.iter().any(|s| s.name == name) {
            return Err(bad(format!("subject `{name}` is listed twice")));
        }
        let folder = data.join(name);
        if !folder.is_dir() {
            return Err(bad(format!(
                "subject `{name}` has no folder {}",
                folder.display()
            )));
        }
        out.push(Subject {
            name: name.to_string(),
            word: class.to_string(),
            folder,
        });
    }
    if out.is_empty() {
        return Err(bad("no subjects listed".into()));
    }
    let entries = std::fs::read_dir(data).map_err(|e| Error::io(data, e))?;
    for e in entries.flatten() {
        let p = e.path();
        let n = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() && !n.starts_with('.') && !out.iter().any(|s| s.name == n) {
            return Err(bad(format!(
                "the folder `{n}` is not in the list: add `{n},CLASS` to give its class"
            )));
        }
    }
    Ok(out)
}
