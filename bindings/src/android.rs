//! Android only: the platform's trust store is Android's own trust manager, which the verifier
//! (`rustls-platform-verifier`) reaches through the JVM, so it needs the app's `Context` once,
//! before the first client connects. `dev.vane.sdk.android.VaneAndroid.init(context)` (in the
//! AAR, bindings/kotlin/android) loads this library and calls this.

use jni::errors::ThrowRuntimeExAndDefault;
use jni::objects::{JClass, JObject};

/// `private external fun initPlatformTrust(context: Context)` of `object VaneAndroid`
/// (`@JvmStatic`). A failure is thrown to Kotlin as a `RuntimeException`.
#[unsafe(no_mangle)]
pub extern "system" fn Java_dev_vane_sdk_android_VaneAndroid_initPlatformTrust<'caller>(
    mut env: jni::EnvUnowned<'caller>,
    _class: JClass<'caller>,
    context: JObject<'caller>,
) {
    env.with_env(|env| -> jni::errors::Result<()> {
        rustls_platform_verifier::android::init_with_env(env, context)
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}
