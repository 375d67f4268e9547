//! STUB — replaced by the config helper.
use std::collections::HashMap;
pub struct Variables(Option<HashMap<String, String>>);
impl Variables {
    pub fn process() -> Self {
        Self(None)
    }
    pub fn map(map: HashMap<String, String>) -> Self {
        Self(Some(map))
    }
    pub fn get(&self, name: &str) -> Option<String> {
        match &self.0 {
            Some(m) => m.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }
}
