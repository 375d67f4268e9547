//! The JSON Schema (draft 2020-12) of `proxy.yaml`, generated from the serde types in
//! [`super::raw`] with `schemars`, for editors (yaml-language-server) and CI. It checks the
//! shape of the document: keys, types, presets, durations and rates. Cross-field rules
//! (a route's credential exists, a URL is https) stay with `s2s-proxy check`. The schema
//! holds no value from any configuration, only the rules.

use std::borrow::Cow;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use super::raw::{
    Credentials, Named, Params, RawBusinessCentral, RawConfig, RawCredential, RawServiceUrl,
    RawUpstream, StringOr,
};

/// Matches a string that holds a `${…}` reference, expanded before the value is parsed.
const REFERENCE: &str = r".*\$\{[^}]*\}.*";

/// The schema as pretty-printed JSON, ending with a newline (`s2s-proxy schema`).
pub fn json_schema() -> String {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let schema = generator.into_root_schema_for::<RawConfig>();
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// `500ms`, `30s`, `5m`, `2h`, or a `${…}` reference.
pub(super) fn duration(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": ["string", "null"],
        "pattern": format!(r"^(?:[0-9]+(?:ms|s|m|h)|{REFERENCE})$"),
        "examples": ["500ms", "30s", "5m", "2h"],
    })
}

/// `100/s`, `20/m`, `6000/5m`, `1000/h`, or a `${…}` reference.
pub(super) fn rate_limit(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": ["string", "null"],
        "pattern": format!(r"^(?:\s*[0-9]+\s*/\s*[0-9]*(?:ms|s|m|h)\s*|{REFERENCE})$"),
        "examples": ["100/s", "20/m", "6000/5m"],
    })
}

// The types below deserialize by hand (see `raw`); their schemas say the same by hand.

impl<T: JsonSchema> JsonSchema for StringOr<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        format!("StringOr{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "anyOf": [{ "type": "string" }, generator.subschema_for::<T>()],
        })
    }
}

impl JsonSchema for RawUpstream {
    fn schema_name() -> Cow<'static, str> {
        "Upstream".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let preset = |name: &str, description: &str, schema: Schema| {
            json_schema!({
                "type": "object",
                "description": description,
                "properties": { name: schema },
                "required": [name],
                "additionalProperties": false,
            })
        };
        json_schema!({
            "description": "The upstream base URL (`https://…`), or exactly one service preset.",
            "oneOf": [
                { "type": "string", "description": "The upstream base URL." },
                preset(
                    "businesscentral",
                    "Business Central API: the tenant (GUID) and environment name.",
                    generator.subschema_for::<RawBusinessCentral>(),
                ),
                preset(
                    "dataverse",
                    "Dataverse Web API of the environment at `url`.",
                    generator.subschema_for::<RawServiceUrl>(),
                ),
                preset(
                    "finance_operations",
                    "Finance & Operations OData of the environment at `url`.",
                    generator.subschema_for::<RawServiceUrl>(),
                ),
            ],
        })
    }
}

impl JsonSchema for Credentials {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Credentials".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "additionalProperties": generator.subschema_for::<RawCredential>(),
        })
    }
}

impl<T: JsonSchema> JsonSchema for Named<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        format!("Named{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "additionalProperties": generator.subschema_for::<T>(),
        })
    }
}

impl JsonSchema for Params {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Params".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "additionalProperties": { "type": "string" },
        })
    }
}
