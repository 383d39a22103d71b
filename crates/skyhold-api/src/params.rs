//! Request parameters: query string and form body merged, `+` decoded as a space, names matched
//! case-insensitively. Every getter turns a bad value into a 431 that names the parameter.

use skyhold_db::Page;
use skyhold_types::{CsError, is_uuid};
use std::collections::HashMap;

/// Longest accepted value of one parameter, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Most parameters accepted in one request.
pub const MAX_PARAMS: usize = 512;

#[derive(Debug, Clone, Default)]
pub struct Params {
    /// Every decoded pair, in order (what the signature covers).
    pub pairs: Vec<(String, String)>,
    map: HashMap<String, String>,
    /// The command, lower-cased, for error texts.
    pub cmd_lc: String,
}

impl Params {
    /// Decode `application/x-www-form-urlencoded` sources into one parameter set.
    pub fn parse(sources: &[&[u8]]) -> Result<Params, CsError> {
        let mut p = Params::default();
        for src in sources {
            for (k, v) in form_urlencoded::parse(src) {
                if k.is_empty() {
                    continue;
                }
                if v.len() > MAX_VALUE_LEN || k.len() > 256 {
                    return Err(CsError::new(
                        skyhold_types::ErrorCode::MalformedParameter,
                        format!("parameter {} is longer than {MAX_VALUE_LEN} bytes", truncate(&k, 64)),
                    ));
                }
                p.pairs.push((k.to_string(), v.to_string()));
                if p.pairs.len() > MAX_PARAMS {
                    return Err(CsError::new(
                        skyhold_types::ErrorCode::MalformedParameter,
                        format!("too many parameters (more than {MAX_PARAMS})"),
                    ));
                }
                p.map.entry(k.to_lowercase()).or_insert_with(|| v.to_string());
            }
        }
        p.cmd_lc = p.map.get("command").map(|c| c.to_lowercase()).unwrap_or_default();
        Ok(p)
    }

    /// The raw value, if given and not empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// Was the parameter given with an empty value (`hosttags=` clears a host's tags)?
    pub fn given_empty(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|v| v.is_empty())
    }

    pub fn missing(&self, name: &str) -> CsError {
        CsError::param(format!("Unable to execute API command {} due to missing parameter {name}", self.cmd_lc))
    }

    pub fn invalid(&self, name: &str, why: &str) -> CsError {
        CsError::param(format!(
            "Unable to execute API command {} due to invalid value. Invalid parameter {name} value={}: {why}",
            self.cmd_lc,
            truncate(self.get(name).unwrap_or(""), 128)
        ))
    }

    pub fn req(&self, name: &str) -> Result<&str, CsError> {
        self.get(name).ok_or_else(|| self.missing(name))
    }

    /// An optional string of at most `max` characters.
    pub fn text(&self, name: &str, max: usize) -> Result<Option<String>, CsError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) if v.chars().count() > max => Err(self.invalid(name, &format!("longer than {max} characters"))),
            Some(v) if v.chars().any(|c| c.is_control()) => Err(self.invalid(name, "contains control characters")),
            Some(v) => Ok(Some(v.to_string())),
        }
    }

    pub fn uuid(&self, name: &str) -> Result<Option<String>, CsError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) if is_uuid(v) => Ok(Some(v.to_lowercase())),
            Some(_) => Err(self.invalid(name, "not a valid UUID")),
        }
    }

    pub fn req_uuid(&self, name: &str) -> Result<String, CsError> {
        self.uuid(name)?.ok_or_else(|| self.missing(name))
    }

    /// A comma-separated list of UUIDs (`ids`), at most 500.
    pub fn uuid_list(&self, name: &str) -> Result<Vec<String>, CsError> {
        let Some(v) = self.get(name) else { return Ok(Vec::new()) };
        let ids: Vec<String> = v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if ids.len() > 500 {
            return Err(self.invalid(name, "more than 500 ids"));
        }
        if ids.iter().any(|i| !is_uuid(i)) {
            return Err(self.invalid(name, "not a list of valid UUIDs"));
        }
        Ok(ids.into_iter().map(|s| s.to_lowercase()).collect())
    }

    /// A boolean, case-insensitive.
    pub fn bool(&self, name: &str) -> Result<Option<bool>, CsError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(_) => Err(self.invalid(name, "must be true or false")),
        }
    }

    pub fn int(&self, name: &str) -> Result<Option<i64>, CsError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| self.invalid(name, "not an integer")),
        }
    }

    /// `page`/`pagesize`, CloudStack's rules: pages start at 1, the size is at most `max`
    /// (`default.page.size`), `-1` means the largest page.
    pub fn page(&self, max: u64) -> Result<Page, CsError> {
        let max = max.max(1);
        let size = match self.int("pagesize")? {
            None | Some(-1) => max,
            Some(n) if n < 1 => return Err(self.invalid("pagesize", "must be at least 1")),
            Some(n) if n as u64 > max => {
                return Err(CsError::param(format!("Page size can't exceed max allowed page size value: {max}")));
            }
            Some(n) => n as u64,
        };
        let page = match self.int("page")? {
            None => 1,
            Some(n) if n < 1 => return Err(self.invalid("page", "must be at least 1")),
            Some(n) => n as u64,
        };
        Ok(Page { page, size })
    }

    /// `keyword`, for LIKE filters.
    pub fn keyword(&self) -> Result<Option<String>, CsError> {
        self.text("keyword", 255)
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Slice one page out of an in-memory list.
pub fn page_slice<T>(items: Vec<T>, page: Page) -> Vec<T> {
    let start = (page.page.saturating_sub(1)).saturating_mul(page.size) as usize;
    items.into_iter().skip(start).take(page.size as usize).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_decodes() {
        let p = Params::parse(&[b"command=listZones&name=a+b", b"Id=x%20y&name=ignored"]).unwrap();
        assert_eq!(p.get("name"), Some("a b"));
        assert_eq!(p.get("id"), Some("x y"));
        assert_eq!(p.cmd_lc, "listzones");
        assert_eq!(p.pairs.len(), 4);
    }

    #[test]
    fn typed_getters_name_the_parameter() {
        let p = Params::parse(&[b"command=deployVirtualMachine&zoneid=nope&startvm=TRUE&page=0"]).unwrap();
        let e = p.req("templateid").unwrap_err();
        assert_eq!(e.code.code(), 431);
        assert!(e.text.contains("missing parameter templateid"), "{}", e.text);
        assert!(p.uuid("zoneid").unwrap_err().text.contains("zoneid"));
        assert_eq!(p.bool("startvm").unwrap(), Some(true));
        assert!(p.page(500).unwrap_err().text.contains("page"));
        let p = Params::parse(&[b"pagesize=501"]).unwrap();
        assert!(p.page(500).is_err());
        let p = Params::parse(&[b"pagesize=-1&page=2"]).unwrap();
        let pg = p.page(500).unwrap();
        assert_eq!((pg.page, pg.size), (2, 500));
    }

    #[test]
    fn oversized_values_are_refused() {
        let big = format!("name={}", "a".repeat(MAX_VALUE_LEN + 1));
        assert_eq!(Params::parse(&[big.as_bytes()]).unwrap_err().code.code(), 430);
    }
}
