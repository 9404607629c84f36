// The idiomatic Kotlin face of the Vane SDK: a builder, lambda and Flow listeners, and
// AutoCloseable. Everything delegates to the generated bindings (package dev.vane.sdk.ffi),
// which call the Rust client core.
package dev.vane.sdk

import dev.vane.sdk.ffi.BoolDetails
import dev.vane.sdk.ffi.ConnectionState
import dev.vane.sdk.ffi.DoubleDetails
import dev.vane.sdk.ffi.FlagListener
import dev.vane.sdk.ffi.FlagSnapshot
import dev.vane.sdk.ffi.FlagType
import dev.vane.sdk.ffi.IntDetails
import dev.vane.sdk.ffi.JsonDetails
import dev.vane.sdk.ffi.ListenerHandle
import dev.vane.sdk.ffi.Reason
import dev.vane.sdk.ffi.StringDetails
import dev.vane.sdk.ffi.Transport
import dev.vane.sdk.ffi.TransportPreference
import dev.vane.sdk.ffi.VaneClient
import dev.vane.sdk.ffi.VaneConfig
import dev.vane.sdk.ffi.VaneException
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.callbackFlow

/**
 * A Vane client for one user (context). Getters never block: they read values held in memory.
 * [waitForInitialization] and [close] block the calling thread; call them off the main thread.
 * Listener callbacks arrive on the SDK's background thread ("vane-sdk"). Errors are
 * [VaneException]: `Network`, `Auth`, `Protocol`, `Config` or `Other`, each with a `reason`.
 *
 * ```
 * val vane = Vane.builder("flags.example.com:7443", mobileKey)
 *     .caPem(caPem)
 *     .context("""{"key": "user-1", "country": "de"}""")
 *     .cacheDir(context.cacheDir.path)
 *     .build()
 * if (vane.boolValue("new-checkout", false)) { ... }
 * vane.addListener { keys -> runOnUiThread { refresh(keys) } }
 * ```
 */
class Vane private constructor(private val client: VaneClient) : AutoCloseable {

    // Getters read this immutable snapshot instead of crossing JNA on every call (a JNA crossing
    // costs tens of microseconds; see docs/BENCHMARKS.md). It is replaced after every change: by
    // this internal listener, and by each app listener before it runs, so the app reads new values.
    @Volatile private var snapshot: Map<String, FlagSnapshot> = load()
    private val internal: ListenerHandle = client.addListener(object : FlagListener {
        override fun onFlagsChanged(keys: List<String>) {
            snapshot = load()
        }
    })

    private fun load(): Map<String, FlagSnapshot> = client.allValues().associateBy { it.key }

    /** Collects the settings of a [Vane] client. */
    class Builder internal constructor(private val endpoint: String, private val sdkKey: String) {
        private var caPem: String = ""
        private var contextJson: String = "{}"
        private var cacheDir: String? = null
        private var transport: TransportPreference? = null
        private var serverName: String? = null
        private var httpEndpoint: String? = null

        /** PEM of the CA that signed the server's certificate. */
        fun caPem(pem: String) = apply { caPem = pem }

        /** The evaluation context as a JSON object, e.g. `{"key": "user-1"}`. */
        fun context(json: String) = apply { contextJson = json }

        /** Persist the last known values here so a cold start has them without a network. */
        fun cacheDir(path: String) = apply { cacheDir = path }

        /** QUIC, TCP, or (default) both raced. */
        fun transport(preference: TransportPreference) = apply { transport = preference }

        /** The name the server certificate is checked against (default: the endpoint's host). */
        fun serverName(name: String) = apply { serverName = name }

        /**
         * The server's HTTP listener (`https://host:port`): where neither QUIC nor TCP+TLS gets
         * through, the SDK polls the snapshot there, and streams again as soon as it can.
         */
        fun httpEndpoint(url: String) = apply { httpEndpoint = url }

        /** Starts the client; it connects in the background. */
        @Throws(VaneException::class)
        fun build(): Vane = Vane(VaneClient(VaneConfig(endpoint, sdkKey, caPem, contextJson, cacheDir, transport, serverName, httpEndpoint)))
    }

    companion object {
        /** A builder for a client of the server at `endpoint` (`host:port`) with `sdkKey`. */
        fun builder(endpoint: String, sdkKey: String) = Builder(endpoint, sdkKey)
    }

    /** Blocks until live flags arrived; throws [VaneException] (e.g. `Auth` for a bad key). */
    @Throws(VaneException::class)
    fun waitForInitialization(timeoutMs: Long) {
        client.waitForInitialization(timeoutMs.toULong())
        snapshot = load()
    }

    /** The snapshot entry for `key` if it holds a value of type `want`, else why not. */
    private fun lookup(key: String, want: FlagType): Pair<FlagSnapshot?, String?> {
        val s = snapshot[key] ?: return Pair(null, "FLAG_NOT_FOUND")
        return when (s.kind) {
            want -> Pair(s, null)
            null -> Pair(null, s.errorCode ?: "GENERAL")
            else -> Pair(null, "TYPE_MISMATCH")
        }
    }

    private fun <T> details(key: String, want: FlagType, default: T, pick: (FlagSnapshot) -> T?, make: (T, String?, Reason, String?) -> Any): Any {
        val (s, error) = lookup(key, want)
        val value = s?.let(pick)
        return if (s != null && value != null) make(value, s.variant, s.reason, null)
        else make(default, null, Reason.ERROR, error ?: "TYPE_MISMATCH")
    }

    fun boolValue(key: String, default: Boolean): Boolean = lookup(key, FlagType.BOOL).first?.boolValue ?: default
    fun stringValue(key: String, default: String): String = lookup(key, FlagType.STRING).first?.stringValue ?: default
    fun intValue(key: String, default: Long): Long = intDetails(key, default).value
    fun doubleValue(key: String, default: Double): Double = lookup(key, FlagType.NUMBER).first?.numberValue ?: default
    fun jsonValue(key: String, default: String): String = lookup(key, FlagType.JSON).first?.stringValue ?: default

    fun boolDetails(key: String, default: Boolean): BoolDetails =
        details(key, FlagType.BOOL, default, { it.boolValue }, ::BoolDetails) as BoolDetails
    fun stringDetails(key: String, default: String): StringDetails =
        details(key, FlagType.STRING, default, { it.stringValue }, ::StringDetails) as StringDetails
    fun intDetails(key: String, default: Long): IntDetails =
        details(key, FlagType.NUMBER, default, { n -> n.numberValue?.takeIf { it % 1.0 == 0.0 && Math.abs(it) < 9e15 }?.toLong() }, ::IntDetails) as IntDetails
    fun doubleDetails(key: String, default: Double): DoubleDetails =
        details(key, FlagType.NUMBER, default, { it.numberValue }, ::DoubleDetails) as DoubleDetails
    fun jsonDetails(key: String, default: String): JsonDetails =
        details(key, FlagType.JSON, default, { it.stringValue }, ::JsonDetails) as JsonDetails

    /** Every flag with a value: key → value as JSON text. */
    fun allFlags(): Map<String, String> = client.allFlags()

    /** Switch user: the values that differ arrive shortly and listeners are told. */
    @Throws(VaneException::class)
    fun identify(contextJson: String) = client.identify(contextJson)

    /** Calls `onChange` with the keys of flags changed from now on, on the SDK's thread;
     *  `cancel()` (or `close()`) the handle to stop. */
    fun addListener(onChange: (List<String>) -> Unit): ListenerHandle =
        client.addListener(object : FlagListener {
            override fun onFlagsChanged(keys: List<String>) {
                snapshot = load()
                onChange(keys)
            }
        })

    /** The keys of changed flags as a cold Flow; collecting registers a listener. */
    fun changes(): Flow<List<String>> = callbackFlow {
        val handle = addListener { keys -> trySend(keys) }
        awaitClose { handle.cancel() }
    }

    val connectionState: ConnectionState get() = client.connectionState()
    val transport: Transport? get() = client.transport()

    /** Call from your connectivity callback. */
    fun setNetworkAvailable(available: Boolean) = client.setNetworkAvailable(available)

    /** Call from onStart/onStop (or your lifecycle observer). */
    fun setForeground(foreground: Boolean) = client.setForeground(foreground)

    /** Closes the connection, stops listeners and releases the native client. Blocks briefly. */
    override fun close() {
        internal.close()
        client.shutdown()
        client.close()
    }

    /** The raw FFI getter, one JNA crossing per call (for measurements; prefer [boolValue]). */
    fun boolValueDirect(key: String, default: Boolean): Boolean = client.boolValue(key, default)
}
