//! TOML parse and type errors as one line naming the line, the column and the field.

pub(super) fn toml_message(e: &toml::de::Error, text: &str) -> String {
    let msg = one_line(e.message());
    let msg = iresnetc_runtime::fsread::clip(&msg, 160);
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or("");
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            match field_at(text, span.start) {
                Some(field) => format!("line {line}, column {col}: field `{field}`: {msg}"),
                None => format!("line {line}, column {col}: {msg}"),
            }
        }
        None => msg,
    }
}

/// toml's messages span several lines (with a source excerpt); keep one.
fn one_line(msg: &str) -> String {
    let mut parts = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.starts_with('^'))
        .collect::<Vec<_>>();
    parts.dedup();
    parts.join(": ")
}

/// The dotted field (`stages[1].blocks`, `train.warmup`) whose value sits at byte `at` of
/// `text`: the key before `=` on that line, under the last `[table]` / `[[array]]` header
/// above it (an array's element counted from its headers). None where the line holds no key
/// (a broken header, a value spanning lines).
fn field_at(text: &str, at: usize) -> Option<String> {
    let before = text.get(..at)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = text.get(line_start..line_end)?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let mut table = String::new();
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
        }
    }
    let key = iresnetc_runtime::fsread::clip(key, 60);
    Some(if table.is_empty() {
        key
    } else {
        format!("{table}.{key}")
    })
}

#[cfg(test)]
mod tests {
    use super::field_at;

    /// Fields found by hand in a small file: top level, a table, the second array element.
    #[test]
    fn field_names_follow_the_headers() {
        let text = "name = \"m\"\n[[stages]]\nblocks = 1\n[[stages]]\nblocks = \"two\"\n[train]\nwarmup = -5\n";
        let at = |needle: &str| text.find(needle).unwrap();
        assert_eq!(field_at(text, at("\"m\"")).as_deref(), Some("name"));
        assert_eq!(
            field_at(text, at("1\n")).as_deref(),
            Some("stages[0].blocks")
        );
        assert_eq!(
            field_at(text, at("\"two\"")).as_deref(),
            Some("stages[1].blocks")
        );
        assert_eq!(field_at(text, at("-5")).as_deref(), Some("train.warmup"));
        assert_eq!(field_at(text, at("[train]")), None);
    }
}
