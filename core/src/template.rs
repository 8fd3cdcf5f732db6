//! `{name}` templates: alert messages and notification topics.

/// Fills `template`: each `{name}` is replaced by what `fill` writes for `name`; when
/// `fill` returns `false` (an unknown name) the placeholder is kept as it is, and an
/// unclosed `{` is kept as text.
pub fn fill(template: &str, mut fill: impl FnMut(&str, &mut String) -> bool) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &after[..close];
        if !fill(name, &mut out) {
            out.push('{');
            out.push_str(name);
            out.push('}');
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_names_are_filled_and_the_rest_kept() {
        let got = fill("a/{x}/{y}/{x", |name, out| {
            if name == "x" {
                out.push('1');
                true
            } else {
                false
            }
        });
        assert_eq!(got, "a/1/{y}/{x");
    }
}
