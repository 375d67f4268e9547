//! Unit tests of `init`: validation of typed answers, the written files, and the dialogue
//! driven with scripted input.

use std::collections::HashMap;
use std::io::Cursor;

use super::prompt::Prompter;
use super::*;
use crate::test_support::TempDir;

const TENANT: &str = "5f0c8e1a-3b2d-4c6e-9a7f-0d1e2f3a4b5c";
const CLIENT: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const SECRET: &str = "Xq8Q~cAnArY.sEcReT_value-1234567890abcd";

fn answers(product: Product, target: Target) -> Answers {
    Answers {
        product,
        tenant_id: TENANT.to_owned(),
        client_id: CLIENT.to_owned(),
        client_secret: Secret::new(SECRET),
        target,
        client_name: "erp-sync".to_owned(),
    }
}

/// Loads `yaml` with the secrets it refers to set.
fn load(yaml: &str, secret_var: &str) -> Config {
    let source = Source::inline(
        "proxy.yaml",
        HashMap::from([
            (secret_var.to_owned(), SECRET.to_owned()),
            ("ERP_SYNC_PASSWORD".to_owned(), "pw".to_owned()),
        ]),
    );
    Config::from_yaml_str(yaml, &source).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

#[test]
fn guids_are_checked_and_normalised() {
    assert_eq!(
        parse_guid(&format!(" {{{}}} ", TENANT.to_uppercase())).unwrap(),
        TENANT
    );
    for bad in [
        "",
        "5f0c8e1a-3b2d-4c6e-9a7f-0d1e2f3a4b5",
        "5f0c8e1a3b2d4c6e9a7f0d1e2f3a4b5c",
        "5f0c8e1a-3b2d-4c6e-9a7f-0d1e2f3a4b5g",
        "app-1",
    ] {
        let message = parse_guid(bad).unwrap_err();
        assert!(
            message.contains("not a GUID") && message.contains(bad),
            "{message}"
        );
    }
}

#[test]
fn tenants_are_guids_or_verified_domains() {
    assert_eq!(parse_tenant(TENANT).unwrap(), TENANT);
    assert_eq!(
        parse_tenant("Contoso.onmicrosoft.com").unwrap(),
        "contoso.onmicrosoft.com"
    );
    for bad in [
        "common",
        "organizations",
        "not-a-guid",
        "contoso..com",
        "a b.com",
        "x.123",
    ] {
        assert!(parse_tenant(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn service_urls_are_https_environment_urls() {
    let fo = Product::FinanceOperations;
    let dv = Product::Dataverse;
    assert_eq!(
        parse_service_url(fo, " https://Contoso.operations.dynamics.com/ ").unwrap(),
        "https://contoso.operations.dynamics.com"
    );
    assert_eq!(
        parse_service_url(dv, "https://contoso.crm4.dynamics.com").unwrap(),
        "https://contoso.crm4.dynamics.com"
    );
    let cases = [
        (
            dv,
            "http://contoso.crm4.dynamics.com",
            "not an https:// URL",
        ),
        (dv, "contoso.crm4.dynamics.com", "not an https:// URL"),
        (
            dv,
            "https://contoso.crm4.dynamics.com/api/data/v9.2",
            "has a path",
        ),
        (
            fo,
            "https://contoso.operations.dynamics.com/data/",
            "has a path",
        ),
        (
            fo,
            "https://contoso.operations.dynamics.com?x=1",
            "has a path",
        ),
        (
            dv,
            "https://user@contoso.crm4.dynamics.com",
            "not an environment URL",
        ),
        (dv, "https://localhost", "not an environment URL"),
        (
            dv,
            "https://contoso.operations.dynamics.com",
            "Finance & Operations URL",
        ),
        (fo, "https://contoso.crm4.dynamics.com", "Dataverse URL"),
        (
            fo,
            "https://api.businesscentral.dynamics.com",
            "Business Central URL",
        ),
    ];
    for (product, url, expected) in cases {
        let message = parse_service_url(product, url).unwrap_err();
        assert!(message.contains(expected), "{url}: {message}");
    }
}

#[test]
fn environment_and_client_names() {
    assert_eq!(parse_environment(" Sandbox-2 ").unwrap(), "Sandbox-2");
    assert!(parse_environment("Prod env").is_err());
    assert!(parse_environment("../x").is_err());
    assert_eq!(parse_client_name("edi_1").unwrap(), "edi_1");
    assert!(parse_client_name("erp sync").is_err());
    assert!(parse_client_name(&"a".repeat(65)).is_err());
    assert_eq!(password_var("erp-sync"), "ERP_SYNC_PASSWORD");
    assert_eq!(password_var("9lives"), "CLIENT_9LIVES_PASSWORD");
}

#[test]
fn secrets_that_are_guids_are_suspected_ids() {
    assert!(secret_looks_like_id(CLIENT));
    assert!(!secret_looks_like_id(SECRET));
    assert!(check_secret("").is_err());
    assert!(check_secret("a b").is_err());
    assert!(check_secret("a\tb").is_err());
    let error = read_secret(Cursor::new(format!("{SECRET}\r\n"))).unwrap();
    assert_eq!(error.expose(), SECRET);
    assert!(matches!(
        read_secret(Cursor::new("\n")),
        Err(InitError::Secret(_))
    ));
}

#[test]
fn each_product_renders_a_config_the_loader_accepts_without_its_secret() {
    let cases = [
        (
            answers(
                Product::BusinessCentral,
                Target::Environment("Sandbox".to_owned()),
            ),
            format!("https://api.businesscentral.dynamics.com/v2.0/{TENANT}/Sandbox/"),
            "https://api.businesscentral.dynamics.com/.default",
            "/bc/",
        ),
        (
            answers(
                Product::FinanceOperations,
                Target::Url("https://contoso.operations.dynamics.com".to_owned()),
            ),
            "https://contoso.operations.dynamics.com/data/".to_owned(),
            "https://contoso.operations.dynamics.com/.default",
            "/fo/",
        ),
        (
            answers(
                Product::Dataverse,
                Target::Url("https://contoso.crm4.dynamics.com".to_owned()),
            ),
            "https://contoso.crm4.dynamics.com/api/data/v9.2/".to_owned(),
            "https://contoso.crm4.dynamics.com/.default",
            "/dataverse/",
        ),
    ];
    for (answers, upstream, scope, prefix) in cases {
        let yaml = answers.render_config();
        assert!(!yaml.contains(SECRET), "{yaml}");
        assert!(yaml.contains(&format!("${{{}}}", answers.product.secret_var())));
        let config = load(&yaml, answers.product.secret_var());
        let route = &config.routes[0];
        assert_eq!(route.prefix, prefix);
        assert_eq!(route.upstream.url.to_string(), upstream);
        assert_eq!(route.scope.as_deref(), Some(scope));
        assert!(route.preset.is_some(), "{yaml}");
        assert_eq!(route.clients, ["erp-sync"]);
        assert_eq!(config.clients.len(), 1);
        assert_eq!(config.credentials.len(), 1);
    }
}

#[test]
fn env_values_survive_shell_quoting() {
    let values = [
        "plain_Value-1.2",
        "~starts.with.tilde",
        "has:colon",
        "it's",
        "a b",
        "$HOME",
        "back\\slash",
        "\"q\"",
        "x=y",
    ];
    let mut text = String::from("# comment\n\nexport FIRST=1\n");
    for (n, value) in values.iter().enumerate() {
        text.push_str(&env_line(&format!("V{n}"), value));
    }
    let parsed = parse_env_file(&text, "test.env").unwrap();
    assert_eq!(parsed[0], ("FIRST".to_owned(), "1".to_owned()));
    for (n, value) in values.iter().enumerate() {
        assert_eq!(parsed[n + 1], (format!("V{n}"), (*value).to_owned()));
    }
    assert_eq!(shell_word("abc~def"), "abc~def");
    assert_eq!(shell_word("~abc"), "'~abc'");
    assert!(matches!(
        parse_env_file("A='open\n", "x.env"),
        Err(InitError::EnvFile { line: 1, .. })
    ));
    assert!(parse_env_file("1A=x\n", "x.env").is_err());
}

#[cfg(unix)]
#[test]
fn write_is_exclusive_private_and_forced_only_on_request() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("init-write");
    let target = dir.path().join("new-sub");
    let bc = answers(
        Product::BusinessCentral,
        Target::Environment("Production".to_owned()),
    );
    let written = write(&bc, &target, false).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&written.env), 0o600);
    let env = std::fs::read_to_string(&written.env).unwrap();
    let vars: HashMap<_, _> = parse_env_file(&env, "env").unwrap().into_iter().collect();
    assert_eq!(vars["BC_CLIENT_SECRET"], SECRET);
    assert_eq!(vars["ERP_SYNC_PASSWORD"], written.password.expose());
    assert!(written.password.expose().len() >= 43);
    let yaml = std::fs::read_to_string(&written.config).unwrap();
    assert!(!yaml.contains(SECRET) && !yaml.contains(written.password.expose()));
    // The summary shows the password (its one appearance), never the client secret.
    let summary = summary(&written);
    assert!(summary.contains(written.password.expose()) && !summary.contains(SECRET));

    // A second run without force touches nothing.
    let error = write(&bc, &target, false).unwrap_err();
    assert!(
        matches!(&error, InitError::Exists(p) if p.len() == 2),
        "{error}"
    );
    assert!(error.to_string().contains("--force"), "{error}");
    assert_eq!(std::fs::read_to_string(&written.env).unwrap(), env);
    // Either file alone blocks too.
    std::fs::remove_file(&written.config).unwrap();
    assert!(
        matches!(write(&bc, &target, false), Err(InitError::Exists(p)) if p == [written.env.clone()])
    );
    assert!(!written.config.exists());

    // Forced: rewritten, and a loosened env file is private again.
    std::fs::set_permissions(&written.env, std::fs::Permissions::from_mode(0o644)).unwrap();
    let again = write(&bc, &target, true).unwrap();
    assert_eq!(mode(&again.env), 0o600);
    assert_ne!(again.password.expose(), written.password.expose());
    let loaded = load_with_env_file(&again.config, &again.env).unwrap();
    assert_eq!(loaded.routes[0].prefix, "/bc/");
}

#[test]
fn flags_need_the_right_target_for_the_product() {
    let base = Flags {
        product: Some(Product::Dataverse),
        tenant_id: Some(TENANT.to_owned()),
        client_id: Some(CLIENT.to_owned()),
        client_name: Some("erp-sync".to_owned()),
        ..Flags::default()
    };
    let usage = |flags: Flags| match flags.into_answers(Secret::new(SECRET)) {
        Err(InitError::Usage(message)) => message,
        other => panic!("{other:?}"),
    };
    assert!(usage(base.clone()).contains("--url"));
    assert!(
        usage(Flags {
            environment: Some("Production".to_owned()),
            ..base.clone()
        })
        .contains("--environment is for Business Central")
    );
    assert!(
        usage(Flags {
            url: Some("https://x.crm.dynamics.com/api".to_owned()),
            ..base.clone()
        })
        .starts_with("--url:")
    );
    assert!(
        usage(Flags {
            tenant_id: Some("nope".to_owned()),
            ..base.clone()
        })
        .starts_with("--tenant-id:")
    );
    assert!(
        usage(Flags {
            client_id: Some("app-1".to_owned()),
            ..base.clone()
        })
        .starts_with("--client-id:")
    );
    let bc = Flags {
        product: Some(Product::BusinessCentral),
        ..base
    };
    assert!(
        usage(Flags {
            url: Some("https://x.crm.dynamics.com".to_owned()),
            ..bc.clone()
        })
        .contains("Business Central takes --environment")
    );
    let (answers, warnings) = bc.clone().into_answers(Secret::new(SECRET)).unwrap();
    assert_eq!(answers.target, Target::Environment("Production".to_owned()));
    assert!(warnings.is_empty());
    let (_, warnings) = bc.into_answers(Secret::new(CLIENT)).unwrap();
    assert!(warnings[0].contains("AADSTS7000215"), "{warnings:?}");
}

/// Runs the dialogue on `script`; returns the answers (or error) and what was shown.
fn dialogue(script: &str, given: Given) -> (Result<Answers, InitError>, String) {
    let mut prompter = Prompter::new(Cursor::new(script.to_owned()), Vec::new());
    let result = prompter.answers(given);
    let shown = String::from_utf8(prompter.into_output()).unwrap();
    (result, shown)
}

#[test]
fn dialogue_takes_defaults_and_asks_again_after_a_typo() {
    let script = format!(
        "\n\
         {TENANT}x\n\
         {TENANT}\n\
         \n\
         app-1\n\
         {CLIENT}\n\
         {CLIENT}\n\
         n\n\
         {SECRET}\n\
         Prod env\n\
         \n\
         \n"
    );
    let (answers, shown) = dialogue(&script, Given::default());
    let answers = answers.unwrap_or_else(|e| panic!("{e}\n{shown}"));
    assert_eq!(answers.product, Product::BusinessCentral);
    assert_eq!(answers.tenant_id, TENANT);
    assert_eq!(answers.client_id, CLIENT);
    assert_eq!(answers.client_secret.expose(), SECRET);
    assert_eq!(answers.target, Target::Environment("Production".to_owned()));
    assert_eq!(answers.client_name, "erp-sync");
    // Each mistake was explained once and asked again.
    assert_eq!(shown.matches("is not a tenant ID").count(), 1, "{shown}");
    assert_eq!(shown.matches("is not a GUID").count(), 1, "{shown}");
    assert_eq!(shown.matches("An answer is needed").count(), 1, "{shown}");
    assert_eq!(shown.matches("AADSTS7000215").count(), 1, "{shown}");
    assert_eq!(
        shown.matches("not an environment name").count(),
        1,
        "{shown}"
    );
    assert!(
        shown.contains("Business Central environment [Production]: "),
        "{shown}"
    );
    assert!(shown.contains("(typing is hidden)"), "{shown}");
    // The dialogue never writes the secret back.
    assert!(!shown.contains(SECRET), "{shown}");
}

#[test]
fn dialogue_for_dataverse_asks_for_the_url_and_keeps_a_guid_secret_on_yes() {
    let script = format!(
        "dataverse\ncontoso.onmicrosoft.com\n{CLIENT}\n{TENANT}\ny\n\
         https://contoso.crm4.dynamics.com/api/data/v9.2/\nhttps://contoso.crm4.dynamics.com\nedi\n"
    );
    let (answers, shown) = dialogue(&script, Given::default());
    let answers = answers.unwrap_or_else(|e| panic!("{e}\n{shown}"));
    assert_eq!(answers.product, Product::Dataverse);
    assert_eq!(answers.tenant_id, "contoso.onmicrosoft.com");
    assert_eq!(answers.client_secret.expose(), TENANT);
    assert_eq!(
        answers.target,
        Target::Url("https://contoso.crm4.dynamics.com".to_owned())
    );
    assert_eq!(answers.client_name, "edi");
    assert!(shown.contains("has a path"), "{shown}");
    assert!(!shown.contains("Business Central environment"), "{shown}");
}

#[test]
fn dialogue_skips_questions_answered_by_flags_and_stops_at_the_end_of_input() {
    let given = Flags {
        product: Some(Product::FinanceOperations),
        tenant_id: Some(TENANT.to_owned()),
        client_id: Some(CLIENT.to_owned()),
        url: Some("https://contoso.operations.dynamics.com".to_owned()),
        client_name: Some("edi".to_owned()),
        ..Flags::default()
    }
    .validate()
    .unwrap();
    let (answers, shown) = dialogue(&format!("{SECRET}\n"), given);
    assert_eq!(answers.unwrap().client_secret.expose(), SECRET);
    assert_eq!(shown, "Client secret Value (typing is hidden): ");

    let (error, _) = dialogue(&format!("1\n{TENANT}\n"), Given::default());
    assert!(
        matches!(error, Err(InitError::InputEnded("the client ID"))),
        "{error:?}"
    );
}

#[test]
fn confirm_defaults_and_end_of_input_means_no() {
    let mut yes = Prompter::new(Cursor::new("\n"), Vec::new());
    assert!(yes.confirm("Run?", true).unwrap());
    let mut again = Prompter::new(Cursor::new("maybe\nn\n"), Vec::new());
    assert!(!again.confirm("Run?", true).unwrap());
    let mut ended = Prompter::new(Cursor::new(""), Vec::new());
    assert!(!ended.confirm("Run?", true).unwrap());
}
