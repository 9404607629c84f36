// The idiomatic Kotlin face of the Vane SDK: a builder, lambda and Flow listeners, and
// AutoCloseable. Everything delegates to the generated bindings (package dev.vane.sdk.ffi),
// which call the Rust client core.
package dev.vane.sdk

import dev.vane.sdk.ffi.ConnectionState
import dev.vane.sdk.ffi.ContextBuilder
import dev.vane.sdk.ffi.FlagDetails
import dev.vane.sdk.ffi.FlagListener
import dev.vane.sdk.ffi.FlagUpdate
import dev.vane.sdk.ffi.InitStatus
import dev.vane.sdk.ffi.JsonValue
import dev.vane.sdk.ffi.ListenerHandle
import dev.vane.sdk.ffi.LogLevel
import dev.vane.sdk.ffi.LogSink
import dev.vane.sdk.ffi.Reason
import dev.vane.sdk.ffi.StatusListener
import dev.vane.sdk.ffi.Transport
import dev.vane.sdk.ffi.TransportPreference
import dev.vane.sdk.ffi.VaneClient
import dev.vane.sdk.ffi.VaneConfig
import dev.vane.sdk.ffi.VaneException
import dev.vane.sdk.ffi.VaneStatus
import dev.vane.sdk.ffi.VaneValue
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.Executor
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicBoolean
import java.util.logging.Level
import java.util.logging.Logger
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.withContext

/**
 * A Vane client for one user (context). Getters never block: they read values held in memory.
 * [initialize] suspends; [close] blocks briefly (call it off the main thread). Listener
 * callbacks run one at a time on the SDK's callback thread ("vane-sdk-callbacks"), or on the
 * executor given to [Builder.callbackExecutor] (Android: `ContextCompat.getMainExecutor(context)`);
 * a listener that throws is logged (logger `dev.vane.sdk`) and stays registered. Errors are
 * [VaneException]: `Network`, `Auth`, `Protocol`, `Config`, `Closed` or `Other`, each with a
 * `reason`; after [close], every call throws `VaneException.Closed`.
 *
 * ```
 * val vane = Vane.builder("flags.example.com:7443", mobileKey)
 *     .context("""{"key": "user-1", "country": "de"}""")
 *     .cacheDir(context.cacheDir.path)
 *     .callbackExecutor(ContextCompat.getMainExecutor(context))
 *     .build()
 * lifecycleScope.launch { vane.initialize(2_000) }   // READY, SERVING_CACHE or TIMED_OUT
 * if (vane.boolValue("new-checkout", false)) { ... }
 * val registration = vane.addListener { keys -> refresh(keys) }  // until registration.cancel()
 * ```
 */
class Vane private constructor(private val client: VaneClient, callbackExecutor: Executor?) : AutoCloseable {

    private val closed = AtomicBoolean(false)

    // The default callback thread: one, named, a daemon (it never keeps an app's JVM alive).
    private val ownExecutor: ExecutorService? = if (callbackExecutor == null) {
        Executors.newSingleThreadExecutor { task -> Thread(task, "vane-sdk-callbacks").apply { isDaemon = true } }
    } else null
    private val callbacks: Executor = callbackExecutor ?: ownExecutor!!

    /** A registered listener: it stays registered until [cancel] or the client closes —
     *  dropping the registration does not unregister it. */
    inner class Registration internal constructor(private val handle: ListenerHandle) : AutoCloseable {
        /** Stops the callbacks. Idempotent. */
        fun cancel() {
            handle.cancel()
            registrations.remove(this)
        }

        override fun close() = cancel()
    }

    private val registrations = CopyOnWriteArrayList<Registration>()

    // Getters read this immutable snapshot instead of crossing JNA on every call (a crossing
    // costs ~15 µs, most of it JNA's per-call structures; see docs/BENCHMARKS.md). Every change
    // arrives with its new values in one crossing and is applied here, by this internal listener
    // and by each app listener before its callback is dispatched, so the app reads the new values.
    @Volatile private var snapshot: Map<String, FlagDetails> = load()
    private val internal: ListenerHandle = client.addListener(object : FlagListener {
        override fun onFlagsChanged(update: FlagUpdate) = apply(update)
    })

    private fun load(): Map<String, FlagDetails> = client.allDetails().associateBy { it.key }

    /** The keys an update names, for the app's listeners. */
    private fun keysOf(update: FlagUpdate): List<String> = (update.changed.map { it.key } + update.removed).sorted()

    // Every listener's callback brings the same update: the first applies it, the others find
    // it applied and copy nothing.
    @Synchronized
    private fun apply(update: FlagUpdate) {
        val current = snapshot
        if (!update.complete && update.changed.all { current[it.key] == it } && update.removed.none { it in current }) return
        snapshot = if (update.complete) {
            update.changed.associateBy { it.key }
        } else {
            HashMap(snapshot).apply {
                for (d in update.changed) put(d.key, d)
                for (k in update.removed) remove(k)
            }
        }
    }

    private val statusFlow = MutableStateFlow(client.status())
    private val statusHandle: ListenerHandle = client.addStatusListener(object : StatusListener {
        override fun onStatus(status: VaneStatus) {
            statusFlow.value = status
        }
    })

    /**
     * Where the client stands and why, as it changes: `cause` is `CONNECTING`, `CONNECTED` (see
     * `transport`), `OFFLINE` (`lastError` says why; it keeps trying), `SUSPENDED`,
     * `UNAUTHORIZED` (the key is unknown or revoked: it stops, values held are still served) or
     * `STOPPED`; `servingCache` says the values are the offline cache's.
     */
    val status: StateFlow<VaneStatus> = statusFlow.asStateFlow()

    /** Throws `VaneException.Closed` after [close]; `what` names the call (built only then). */
    private inline fun checkOpen(what: () -> String) {
        if (closed.get()) throw VaneException.Closed("${what()} after close()")
    }

    /** Collects the settings of a [Vane] client. */
    class Builder internal constructor(private val endpoint: String, private val sdkKey: String) {
        private var caPem: String? = null
        private var contextJson: String = "{}"
        private var cacheDir: String? = null
        private var transport: TransportPreference? = null
        private var serverName: String? = null
        private var httpEndpoint: String? = null
        private var callbackExecutor: Executor? = null

        /** PEM of a private CA to trust instead of the platform's trust store (e.g. the
         *  server's own `tls/ca.pem`). Without it, the server's certificate is verified like a
         *  browser's: against the roots of Android (or the JVM host's system CA bundle). */
        fun caPem(pem: String) = apply { caPem = pem }

        /** The evaluation context as a JSON object, e.g. `{"key": "user-1"}`. Without a `key`
         *  the user is anonymous: the SDK gives it this device's anonymous key, kept in
         *  [cacheDir] across starts. */
        fun context(json: String) = apply { contextJson = json }

        /** The evaluation context, typed: `ContextBuilder("user-1").string("country", "de")`, or
         *  `ContextBuilder(null)` for an anonymous user. */
        fun context(context: ContextBuilder) = apply { contextJson = context.build() }

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

        /** Where listener callbacks run (default: the SDK's own "vane-sdk-callbacks" thread). */
        fun callbackExecutor(executor: Executor) = apply { callbackExecutor = executor }

        /** Starts the client; it connects in the background. A server key is refused
         *  (`VaneException.Config`): apps take a mobile key. */
        @Throws(VaneException::class)
        fun build(): Vane = Vane(
            VaneClient(VaneConfig(endpoint, sdkKey, caPem, contextJson, cacheDir, transport, serverName, httpEndpoint)),
            callbackExecutor,
        )
    }

    companion object {
        private val log: Logger = Logger.getLogger("dev.vane.sdk")

        /** A builder for a client of the server at `endpoint` (`host:port`) with `sdkKey`. */
        fun builder(endpoint: String, sdkKey: String) = Builder(endpoint, sdkKey)

        /**
         * Sends the SDK's log lines at `level` and above to `log` — e.g.
         * `Vane.setLogger(LogLevel.INFO) { level, tag, message -> Log.println(priority(level), "Vane", message) }`.
         * Called on the thread that logged. Until one is set, the SDK's logs go nowhere. Returns
         * false if the process already routes Rust's `tracing` logs elsewhere.
         */
        fun setLogger(level: LogLevel = LogLevel.WARN, log: (LogLevel, String, String) -> Unit): Boolean =
            dev.vane.sdk.ffi.setLogSink(object : LogSink {
                override fun log(level: LogLevel, target: String, message: String) = log(level, target, message)
            }, level)
    }

    /**
     * Waits up to `timeoutMs` for live values, without blocking a thread of the caller's, and
     * says how it went: [InitStatus.READY], [InitStatus.SERVING_CACHE] (offline, the cache's
     * values are served) or [InitStatus.TIMED_OUT] (the getters answer defaults until values
     * arrive). Being offline is not an error; a rejected key is (`VaneException.Auth`).
     */
    @Throws(VaneException::class)
    suspend fun initialize(timeoutMs: Long): InitStatus {
        checkOpen { "initialize" }
        val status = withContext(Dispatchers.IO) { client.initialize(timeoutMs.toULong()) }
        snapshot = load()
        return status
    }

    /** Whether live values have arrived. */
    val isInitialized: Boolean get() = !closed.get() && client.isInitialized()

    /** Blocks until live flags arrived; throws [VaneException] (`Network` on timeout, `Auth` for a
     *  bad key). Prefer [initialize], which does not throw for being offline. */
    @Throws(VaneException::class)
    fun waitForInitialization(timeoutMs: Long) {
        checkOpen { "waitForInitialization" }
        client.waitForInitialization(timeoutMs.toULong())
        snapshot = load()
    }

    /** A value with how it was decided: the value (or the caller's default), the variant,
     *  the reason, and OpenFeature's error code when the default was served. */
    data class Details<T>(val value: T, val variant: String?, val reason: Reason, val errorCode: String?)

    /** `key`'s value if it is of the type `pick` takes, else `default` with why. */
    private inline fun <T> typed(key: String, default: T, pick: (VaneValue) -> T?): Details<T> {
        checkOpen { "reading $key" }
        val d = snapshot[key] ?: return Details(default, null, Reason.ERROR, "FLAG_NOT_FOUND")
        val value = d.value ?: return Details(default, null, Reason.ERROR, d.errorCode ?: "GENERAL")
        val picked = pick(value) ?: return Details(default, null, Reason.ERROR, "TYPE_MISMATCH")
        return Details(picked, d.variant, d.reason, null)
    }

    fun boolDetails(key: String, default: Boolean): Details<Boolean> = typed(key, default) { (it as? VaneValue.Bool)?.value }
    fun stringDetails(key: String, default: String): Details<String> = typed(key, default) { (it as? VaneValue.Text)?.value }
    fun intDetails(key: String, default: Long): Details<Long> =
        typed(key, default) { v -> (v as? VaneValue.Number)?.value?.takeIf { it % 1.0 == 0.0 && Math.abs(it) < 9e15 }?.toLong() }
    fun doubleDetails(key: String, default: Double): Details<Double> = typed(key, default) { (it as? VaneValue.Number)?.value }
    /** A `json` flag's document, typed (`JsonValue.Object`, `.Array`, `.Text`, ...); [allFlags]
     *  has it as JSON text. */
    fun jsonDetails(key: String, default: JsonValue): Details<JsonValue> = typed(key, default) { (it as? VaneValue.Json)?.value }

    // The value getters allocate nothing: one map lookup and a type test.
    private fun valueOf(key: String): VaneValue? {
        checkOpen { "reading $key" }
        return snapshot[key]?.value
    }

    fun boolValue(key: String, default: Boolean): Boolean = (valueOf(key) as? VaneValue.Bool)?.value ?: default
    fun stringValue(key: String, default: String): String = (valueOf(key) as? VaneValue.Text)?.value ?: default
    fun intValue(key: String, default: Long): Long = intDetails(key, default).value
    fun doubleValue(key: String, default: Double): Double = (valueOf(key) as? VaneValue.Number)?.value ?: default
    fun jsonValue(key: String, default: JsonValue): JsonValue = (valueOf(key) as? VaneValue.Json)?.value ?: default

    /** Every flag with a value: key → value as JSON text. */
    fun allFlags(): Map<String, String> {
        checkOpen { "allFlags" }
        return client.allFlags()
    }

    /** Switch user: the values that differ arrive shortly and listeners are told. */
    @Throws(VaneException::class)
    fun identify(contextJson: String) {
        checkOpen { "identify" }
        client.identify(contextJson)
    }

    /** Switch user, with a typed context. */
    @Throws(VaneException::class)
    fun identify(context: ContextBuilder) = identify(context.build())

    /**
     * Switch user and wait up to `timeoutMs`, without blocking a thread of the caller's, until
     * the getters answer for the new context: true once they do, false if its values did not
     * arrive in time (offline: the previous user's values are served until they do). Throws
     * for a bad context, a rejected key or a closed client.
     */
    @Throws(VaneException::class)
    suspend fun identify(contextJson: String, timeoutMs: Long): Boolean {
        checkOpen { "identify" }
        val done = withContext(Dispatchers.IO) { client.identifyAndWait(contextJson, timeoutMs.toULong()) }
        if (done) snapshot = load()
        return done
    }

    /** [identify] and wait, with a typed context. */
    @Throws(VaneException::class)
    suspend fun identify(context: ContextBuilder, timeoutMs: Long): Boolean = identify(context.build(), timeoutMs)

    /** The targeting key in use: the context's own, or this device's anonymous key. */
    val contextKey: String? get() = client.contextKey()

    /**
     * Calls `onChange` with the keys of flags changed from now on, on the callback executor,
     * after the getters already answer the new values. The listener stays registered until the
     * returned registration is cancelled or the client closes — dropping the registration does
     * not unregister it.
     */
    fun addListener(onChange: (List<String>) -> Unit): Registration {
        checkOpen { "addListener" }
        val handle = client.addListener(object : FlagListener {
            override fun onFlagsChanged(update: FlagUpdate) {
                apply(update)
                val keys = keysOf(update)
                callbacks.execute {
                    try {
                        onChange(keys)
                    } catch (e: Throwable) {
                        log.log(Level.WARNING, "a Vane listener threw; it stays registered", e)
                    }
                }
            }
        })
        return Registration(handle).also { registrations.add(it) }
    }

    /** The keys of changed flags as a cold Flow; collecting registers a listener. */
    fun changes(): Flow<List<String>> = callbackFlow {
        val handle = addListener { keys -> trySend(keys) }
        awaitClose { handle.cancel() }
    }

    val connectionState: ConnectionState get() = if (closed.get()) ConnectionState.STOPPED else client.connectionState()
    val transport: Transport? get() = if (closed.get()) null else client.transport()

    /** Call from your connectivity callback. */
    fun setNetworkAvailable(available: Boolean) {
        checkOpen { "setNetworkAvailable" }
        client.setNetworkAvailable(available)
    }

    /** Call from onStart/onStop (or your lifecycle observer). */
    fun setForeground(foreground: Boolean) {
        checkOpen { "setForeground" }
        client.setForeground(foreground)
    }

    /** Closes the connection, stops listeners and releases the native client. Blocks briefly.
     *  Idempotent: a second call does nothing. */
    override fun close() {
        if (!closed.compareAndSet(false, true)) return
        registrations.forEach { it.cancel() }
        internal.cancel()
        internal.close()
        statusHandle.cancel()
        statusHandle.close()
        client.shutdown()
        client.close()
        ownExecutor?.shutdown()
    }

    /** One flag's details read across the FFI, one crossing (for measurements; prefer the
     *  getters, which read the snapshot). */
    fun detailsDirect(key: String): FlagDetails {
        checkOpen { "detailsDirect" }
        return client.details(key)
    }
}
