//! `vane serve --demo`: an environment `demo` with a few flags of every type, a server key and a
//! mobile key, so the quick start has something to watch from a service and from an app. The
//! secrets are kept in `DATA/demo-sdk-key` and `DATA/demo-mobile-key` (mode 0600), since the
//! store only holds their hashes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde_json::json;
use vane_core::model::{Flag, FlagValue, Serve};

use crate::control::{Control, Edit, SYSTEM_ACTOR};
use crate::keys::KeyKind;

fn flag(
    key: &str,
    on: bool,
    variants: &[(&str, FlagValue)],
    off: &str,
    serve: &str,
    description: &str,
) -> Flag {
    Flag {
        key: key.into(),
        on,
        variants: variants
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        off_variant: off.into(),
        rules: Vec::new(),
        fallthrough: Serve::Variant(serve.into()),
        description: description.into(),
        tags: Vec::new(),
        version: 0,
    }
}

/// Creates the demo environment on first use and prints its server key.
pub async fn seed(control: &Arc<Control>, data_dir: &Path) -> anyhow::Result<()> {
    let key_path = data_dir.join("demo-sdk-key");
    let mobile_path = data_dir.join("demo-mobile-key");
    if control.hub().env("demo").is_none() {
        control.create_env("demo", SYSTEM_ACTOR).await?;
        let mut new_checkout = Flag::boolean("new-checkout", true, true);
        new_checkout.description = "The redesigned checkout flow".into();
        let flags = [
            new_checkout,
            Flag::boolean("dark-mode", false, true),
            flag(
                "banner-text",
                true,
                &[
                    ("welcome", FlagValue::String("Welcome to Vane!".into())),
                    ("none", FlagValue::String(String::new())),
                ],
                "none",
                "welcome",
                "Text of the top banner",
            ),
            flag(
                "max-items",
                true,
                &[
                    ("small", FlagValue::Number(10.0)),
                    ("large", FlagValue::Number(50.0)),
                ],
                "small",
                "large",
                "Items per page",
            ),
            flag(
                "theme",
                true,
                &[(
                    "default",
                    FlagValue::Json(json!({"primary": "#0b5fff", "rounded": true})),
                )],
                "default",
                "default",
                "Theme settings",
            ),
        ];
        for f in flags {
            control.edit("demo", Edit::PutFlag(f), SYSTEM_ACTOR).await?;
        }
        let key = control
            .create_key("demo", KeyKind::Server, SYSTEM_ACTOR)
            .await?;
        crate::tls::write_private(&key_path, format!("{}\n", key.secret).as_bytes())
            .with_context(|| format!("writing {}", key_path.display()))?;
    }
    // Mobile apps take a mobile key (values only): demos from before it was made get one too.
    if !mobile_path.exists() && control.hub().env("demo").is_some() {
        let key = control
            .create_key("demo", KeyKind::Mobile, SYSTEM_ACTOR)
            .await?;
        crate::tls::write_private(&mobile_path, format!("{}\n", key.secret).as_bytes())
            .with_context(|| format!("writing {}", mobile_path.display()))?;
    }
    match std::fs::read_to_string(&key_path) {
        Ok(secret) => println!(
            "demo environment ready; its server SDK key (also in {}):\n  {}",
            key_path.display(),
            secret.trim()
        ),
        Err(_) => println!(
            "demo environment exists, but {} is gone; create a key with: vane key create demo --kind server",
            key_path.display()
        ),
    }
    if let Ok(secret) = std::fs::read_to_string(&mobile_path) {
        println!(
            "its mobile SDK key, for apps (also in {}):\n  {}",
            mobile_path.display(),
            secret.trim()
        );
    }
    Ok(())
}
