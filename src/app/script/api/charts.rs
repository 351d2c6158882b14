//! Charts in scripts: `scatter` (point sets as panel rows), `line_chart` (measures over
//! training, with error bars), and the toy's `score_field`; each returns an image that `show`
//! draws and `save` writes.

use rhai::{Array, Dynamic, Map, FLOAT, INT};

use super::images::Img;
use super::toy::{array_to_points, CustomVal, ToyVal};
use super::Api;
use crate::app::script::docs::{FnSpec, Kind};
use crate::app::script::{err, rt, Opts, RhaiResult};
use crate::util::plot::{
    arrows_row, line_chart, number_text, scatter_row, Frame, Line, Panel, Scatter, PALETTE,
};

/// Panels from one map or an array of maps.
fn maps(v: Dynamic, what: &str) -> RhaiResult<Vec<Map>> {
    let list = if v.is_map() {
        vec![v]
    } else {
        v.into_array()
            .map_err(|t| err(format!("{what}: a map or an array of maps, not {t}")))?
    };
    list.into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.try_cast::<Map>()
                .ok_or_else(|| err(format!("{what}: element {i} is not a map")))
        })
        .collect()
}

fn text(m: &Map, key: &str) -> String {
    m.get(key).map(|v| v.to_string()).unwrap_or_default()
}

fn frame_opt(o: &Opts<'_>, default: Frame) -> RhaiResult<Frame> {
    match o.get("range") {
        None => Ok(default),
        Some(v) => {
            let r: Vec<FLOAT> = v
                .into_array()
                .ok()
                .and_then(|a| {
                    a.iter()
                        .map(|x| {
                            x.as_float()
                                .ok()
                                .or_else(|| x.as_int().ok().map(|i| i as FLOAT))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let frame = match r.as_slice() {
                [x0, x1, y0, y1] if x0 < x1 && y0 < y1 => Frame {
                    x: (*x0 as f32, *x1 as f32),
                    y: (*y0 as f32, *y1 as f32),
                },
                _ => {
                    return Err(err(
                        "range: [x_min, x_max, y_min, y_max], each min below its max",
                    ))
                }
            };
            // The plane is drawn in f32: an end past its largest value (or not finite) is
            // refused by name, not turned into an infinity.
            if let Some(v) = r
                .iter()
                .find(|v| !v.is_finite() || v.abs() > f32::MAX as FLOAT)
            {
                return Err(err(format!(
                    "range: {} is not a finite number within ±{:e}",
                    number_text(*v),
                    f32::MAX
                )));
            }
            rt(frame.check())?;
            Ok(frame)
        }
    }
}

fn scatter_spec() -> FnSpec {
    FnSpec::new("scatter")
        .sig("scatter(panels) -> Image")
        .sig("scatter(panels, options) -> Image")
        .doc("A row of scatter plots: `panels` is one map or an array of maps #{title, sets: [#{label, points}]}, points an array of [x, y] (as toy.sample gives); the sets are coloured in order, with a legend, ticks and axis titles.")
        .opt("title", Kind::Str, "", "the figure's title")
        .opt("size", Kind::Int { min: 64, max: 4096 }, 320 as INT, "each panel's side in pixels")
        .opt_unset("range", Kind::Other("[x_min, x_max, y_min, y_max]"), "the plane shown (default: -3..3 both ways)")
        .example("let img = scatter([#{title: \"base\", sets: [#{label: \"top_left\", points: toy.sample(0, 300)}]}]); save(img, \"base.png\");")
}

fn scatter(spec: &FnSpec, panels: Dynamic, o: &Map) -> RhaiResult<Img> {
    let o = Opts::of(o, spec)?;
    let frame = frame_opt(
        &o,
        Frame {
            x: (-3.0, 3.0),
            y: (-3.0, 3.0),
        },
    )?;
    let panels = maps(panels, "panels")?
        .into_iter()
        .map(|p| {
            let sets = maps(
                p.get("sets")
                    .cloned()
                    .unwrap_or(Dynamic::from(Array::new())),
                "sets",
            )?
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let pts = s
                    .get("points")
                    .cloned()
                    .unwrap_or(Dynamic::UNIT)
                    .into_array()
                    .map_err(|t| err(format!("sets: `points` is an array of [x, y], not {t}")))?;
                Ok(Scatter {
                    label: text(&s, "label"),
                    color: PALETTE[i % PALETTE.len()],
                    points: array_to_points(pts, "points")?,
                })
            })
            .collect::<RhaiResult<Vec<_>>>()?;
            Ok(Panel {
                title: text(&p, "title"),
                content: sets,
            })
        })
        .collect::<RhaiResult<Vec<_>>>()?;
    let size = o.usize("size").unwrap_or(320) as u32;
    Ok(Img::new(rt(scatter_row(
        &panels,
        frame,
        size,
        &o.string("title").unwrap_or_default(),
    ))?))
}

fn line_chart_spec() -> FnSpec {
    FnSpec::new("line_chart")
        .sig("line_chart(lines) -> Image")
        .sig("line_chart(lines, options) -> Image")
        .doc("A line chart of one or more lines #{label, x: [...], y: [...], err: [...]} (err, optional: a standard error per point, drawn as error bars). The y axis spans the data and its error bars padded by 10%; both axes have ticks and titles.")
        .opt("title", Kind::Str, "", "the chart's title")
        .opt("x_title", Kind::Str, "step", "the x axis's title")
        .opt("y_title", Kind::Str, "value", "the y axis's title")
        .opt("width", Kind::Int { min: 64, max: 4096 }, 640 as INT, "pixels")
        .opt("height", Kind::Int { min: 64, max: 4096 }, 400 as INT, "pixels")
        .example("let img = line_chart([#{label: \"full\", x: [0, 100, 200], y: f, err: se}], #{y_title: \"Fisher\"});")
}

fn numbers(m: &Map, key: &str) -> RhaiResult<Option<Vec<f64>>> {
    let Some(v) = m.get(key) else { return Ok(None) };
    let a = v
        .clone()
        .into_array()
        .map_err(|t| err(format!("`{key}`: an array of numbers, not {t}")))?;
    a.iter()
        .map(|x| {
            x.as_float()
                .ok()
                .or_else(|| x.as_int().ok().map(|i| i as FLOAT))
                .ok_or_else(|| err(format!("`{key}`: {x} is not a number")))
        })
        .collect::<RhaiResult<Vec<_>>>()
        .map(Some)
}

fn line(spec: &FnSpec, lines: Dynamic, o: &Map) -> RhaiResult<Img> {
    let o = Opts::of(o, spec)?;
    let lines = maps(lines, "lines")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let y = numbers(&m, "y")?.ok_or_else(|| err("lines: each needs `y`"))?;
            let x = numbers(&m, "x")?.unwrap_or_else(|| (0..y.len()).map(|i| i as f64).collect());
            let e = numbers(&m, "err")?;
            if x.len() != y.len() || e.as_ref().is_some_and(|e| e.len() != y.len()) {
                return Err(err(format!(
                    "line {i}: x, y and err must be as long as each other"
                )));
            }
            let points = (0..y.len())
                .map(|k| (x[k], y[k], e.as_ref().map(|e| e[k])))
                .collect();
            Ok(Line {
                label: text(&m, "label"),
                color: PALETTE[i % PALETTE.len()],
                points,
            })
        })
        .collect::<RhaiResult<Vec<_>>>()?;
    let titles = (
        o.string("title").unwrap_or_default(),
        o.string("x_title").unwrap_or_default(),
        o.string("y_title").unwrap_or_default(),
    );
    let size = (
        o.usize("width").unwrap_or(640) as u32,
        o.usize("height").unwrap_or(400) as u32,
    );
    Ok(Img::new(rt(line_chart(
        &lines,
        (&titles.0, &titles.1, &titles.2),
        size,
    ))?))
}

fn score_field_spec() -> FnSpec {
    FnSpec::new("score_field")
        .sig("score_field(models, concept) -> Image")
        .sig("score_field(models, concept, options) -> Image")
        .doc("The score field grad log p_t(x | concept) = -eps / sqrt(1 - abar_t) of one toy model or an array of them (foundation and snapshots: a panel each, figure 7), as arrows on a grid over the plane, scaled together within each panel.")
        .opt("t", Kind::Int { min: 0, max: 999 }, 100 as INT, "the timestep")
        .opt("grid", Kind::Int { min: 2, max: 64 }, 15 as INT, "arrows a side")
        .opt("size", Kind::Int { min: 64, max: 4096 }, 320 as INT, "each panel's side in pixels")
        .opt("title", Kind::Str, "", "the figure's title")
        .opt_unset("titles", Kind::Strings, "each panel's title (default: base, or the method and step)")
        .example("let img = score_field([toy, c.at(100), c], 1, #{t: 50});")
}

fn score_field(spec: &FnSpec, models: Dynamic, concept: Dynamic, o: &Map) -> RhaiResult<Img> {
    let o = Opts::of(o, spec)?;
    let list = if models.is_array() {
        models.cast::<Array>()
    } else {
        vec![models]
    };
    let t = o.usize("t").unwrap_or(100);
    let grid = o.usize("grid").unwrap_or(15);
    let titles = o.strings("titles");
    let mut layout = None;
    let mut panels = vec![];
    for (i, m) in list.into_iter().enumerate() {
        let (toy, custom, name) = if let Some(t) = m.clone().try_cast::<ToyVal>() {
            (t.0.clone(), None, "base".to_string())
        } else if let Some(c) = m.try_cast::<CustomVal>() {
            let name = format!("{} step {}", c.run.last.method.name(), c.step);
            (c.toy.clone(), Some(c), name)
        } else {
            return Err(err(format!(
                "models: element {i} is not a Toy or a ToyCustom"
            )));
        };
        let c = super::toy::concept_arg(&toy, &concept)?;
        layout = Some(toy.layout);
        let custom_ref = match &custom {
            Some(c) => Some(c.custom()?),
            None => None,
        };
        let arrows = rt(crate::toy::plots::score_field(&toy, custom_ref, c, t, grid))?;
        let title = titles
            .as_ref()
            .and_then(|t| t.get(i).cloned())
            .unwrap_or(name);
        panels.push(Panel {
            title,
            content: arrows,
        });
    }
    let layout = layout.ok_or_else(|| err("models: none given"))?;
    let size = o.usize("size").unwrap_or(320) as u32;
    Ok(Img::new(rt(arrows_row(
        &panels,
        crate::toy::plots::frame(layout),
        size,
        &o.string("title").unwrap_or_default(),
    ))?))
}

pub fn register(api: &mut Api) {
    let spec = api.declare(scatter_spec());
    let sp = spec.clone();
    api.func(&spec, move |p: Dynamic| scatter(&sp, p, &Map::new()));
    let sp = spec.clone();
    api.func(&spec, move |p: Dynamic, o: Map| scatter(&sp, p, &o));
    let spec = api.declare(line_chart_spec());
    let sp = spec.clone();
    api.func(&spec, move |l: Dynamic| line(&sp, l, &Map::new()));
    let sp = spec.clone();
    api.func(&spec, move |l: Dynamic, o: Map| line(&sp, l, &o));
    let spec = api.declare(score_field_spec());
    let sp = spec.clone();
    api.func(&spec, move |m: Dynamic, c: Dynamic| {
        score_field(&sp, m, c, &Map::new())
    });
    let sp = spec.clone();
    api.func(&spec, move |m: Dynamic, c: Dynamic, o: Map| {
        score_field(&sp, m, c, &o)
    });
}
