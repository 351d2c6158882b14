//! Says which tensor of a broken safetensors file is at fault. The safetensors crate reports a
//! bad offset at the tensor where the layout stops adding up, which is the neighbour of the one
//! whose size is wrong, or no tensor at all; this reads the header again and names the culprit.

use std::io::Read;
use std::path::Path;

fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// What is wrong with a header (its JSON bytes) over `data_len` bytes of data, tensor by name;
/// `None` when nothing is found.
pub fn diagnose_header(header: &[u8], data_len: u64) -> Option<String> {
    let json: serde_json::Value = match serde_json::from_slice(header) {
        Ok(v) => v,
        Err(e) => return Some(format!("the header is not JSON: {e}")),
    };
    let map = json.as_object()?;
    let mut spans: Vec<(u64, u64, &str)> = vec![];
    for (name, info) in map.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let Some(size) = dtype_bytes(dtype) else {
            return Some(format!("tensor `{name}` has the unknown dtype {dtype:?}"));
        };
        let shape: Option<Vec<u64>> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect());
        let offsets: Option<Vec<u64>> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect());
        let (Some(shape), Some(offsets)) = (shape, offsets) else {
            return Some(format!(
                "tensor `{name}` has no valid shape or data_offsets"
            ));
        };
        let [start, end] = offsets[..] else {
            return Some(format!(
                "tensor `{name}`: data_offsets are not [start, end]"
            ));
        };
        let numel = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let need = numel.and_then(|n| n.checked_mul(size));
        if end < start || need != Some(end - start) {
            return Some(format!(
                "tensor `{name}`: a {dtype} tensor of shape {shape:?} takes {} bytes, its \
                 data_offsets [{start}, {end}] span {}",
                need.map_or("too many".to_string(), |n| n.to_string()),
                end.saturating_sub(start)
            ));
        }
        spans.push((start, end, name));
    }
    spans.sort();
    let mut at = 0;
    let mut before = None;
    for &(start, end, name) in &spans {
        if start != at {
            return Some(match before {
                Some(prev) => format!(
                    "tensor `{name}` starts at byte {start}, where the tensor before it \
                     (`{prev}`) ends at {at}"
                ),
                None => format!("tensor `{name}` starts at byte {start}, not 0"),
            });
        }
        at = end;
        before = Some(name);
    }
    (at != data_len)
        .then(|| format!("the tensors take {at} bytes of data, the file holds {data_len}"))
}

/// [`diagnose_header`] of a whole file's bytes.
pub fn diagnose_bytes(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    if end > bytes.len() {
        return Some(format!(
            "the header claims {n} bytes, the file holds {}",
            bytes.len()
        ));
    }
    diagnose_header(&bytes[8..end], (bytes.len() - end) as u64)
}

/// [`diagnose_header`] of a file, reading only its header.
pub fn diagnose_file(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let n = u64::from_le_bytes(n);
    if n.checked_add(8)? > len {
        return Some(format!("the header claims {n} bytes, the file holds {len}"));
    }
    let mut header = vec![0u8; usize::try_from(n).ok()?];
    f.read_exact(&mut header).ok()?;
    diagnose_header(&header, len - 8 - n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(tensors: &[(&str, &str, &[u64], [u64; 2])]) -> Vec<u8> {
        let m: serde_json::Map<String, serde_json::Value> = tensors
            .iter()
            .map(|(n, d, s, o)| {
                (
                    n.to_string(),
                    serde_json::json!({"dtype": d, "shape": s, "data_offsets": o}),
                )
            })
            .collect();
        serde_json::to_vec(&m).unwrap()
    }

    /// The tensor whose size is wrong is named, not its neighbour.
    #[test]
    fn the_culprit_is_named() {
        let ok = header(&[("a", "F32", &[2, 2], [0, 16]), ("b", "F16", &[3], [16, 22])]);
        assert_eq!(diagnose_header(&ok, 22), None);
        let long = header(&[("a", "F32", &[2, 2], [0, 20]), ("b", "F16", &[3], [20, 26])]);
        let d = diagnose_header(&long, 26).unwrap();
        assert!(
            d.starts_with("tensor `a`") && d.contains("takes 16 bytes"),
            "{d}"
        );
        let gap = header(&[("a", "F32", &[2, 2], [0, 16]), ("b", "F16", &[3], [18, 24])]);
        let d = diagnose_header(&gap, 24).unwrap();
        assert!(
            d.contains("tensor `b` starts at byte 18") && d.contains("(`a`) ends at 16"),
            "{d}"
        );
        assert!(diagnose_header(&ok, 30).unwrap().contains("file holds 30"));
        let odd = header(&[("a", "Q4", &[2], [0, 1])]);
        assert!(diagnose_header(&odd, 1).unwrap().contains("unknown dtype"));
    }
}
