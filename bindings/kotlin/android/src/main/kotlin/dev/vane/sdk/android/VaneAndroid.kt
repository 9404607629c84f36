// Android's side of the platform trust store: the Rust verifier asks Android's trust manager
// through the JVM, which needs the app's Context once, before the first client connects.
package dev.vane.sdk.android

import android.content.Context

/** Call [init] once, e.g. in `Application.onCreate`, before building a `Vane` client. */
object VaneAndroid {
    @Volatile private var initialized = false

    /** Loads the SDK's native library and hands it the application context, so servers are
     *  verified against Android's trust store (user-added CAs and network security config
     *  included). Idempotent. Not needed when every client is given `caPem`. */
    @JvmStatic
    fun init(context: Context) {
        if (initialized) return
        synchronized(this) {
            if (initialized) return
            System.loadLibrary("vane_ffi")
            initPlatformTrust(context.applicationContext)
            initialized = true
        }
    }

    @JvmStatic
    private external fun initPlatformTrust(context: Context)
}
