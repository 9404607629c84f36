// Tests of the Kotlin SDK against a real `vane serve` (started by bindings/kotlin/run-tests):
// that calls, values, errors and callbacks cross the FFI boundary intact. Behaviour itself is
// tested in Rust. Prints one line per test and ends with "N passed, M failed".
package dev.vane.sdk.test

import dev.vane.sdk.Vane
import dev.vane.sdk.ffi.ConnectionState
import dev.vane.sdk.ffi.ContextBuilder
import dev.vane.sdk.ffi.InitStatus
import dev.vane.sdk.ffi.JsonValue
import dev.vane.sdk.ffi.LogLevel
import dev.vane.sdk.ffi.Reason
import dev.vane.sdk.ffi.TransportPreference
import dev.vane.sdk.ffi.VaneException
import java.io.File
import java.net.URI
import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.util.concurrent.CountDownLatch
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.TimeUnit
import kotlin.system.exitProcess
import dev.vane.sdk.ffi.StatusCause
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout

private fun env(name: String): String = System.getenv(name) ?: error("$name is not set (run bindings/kotlin/run-tests)")

private val endpoint = env("VANE_ENDPOINT")
private val httpBase = env("VANE_HTTP")
private val token = env("VANE_TOKEN")
private val ca = File(env("VANE_CA")).readText()
private val http = HttpClient.newHttpClient()
private lateinit var mobileKey: String
private lateinit var serverKey: String

private fun admin(method: String, path: String, body: String? = null): String {
    val request = HttpRequest.newBuilder(URI.create("$httpBase/api/v1$path"))
        .header("Authorization", "Bearer $token")
        .header("Content-Type", "application/json")
        .method(method, if (body == null) HttpRequest.BodyPublishers.noBody() else HttpRequest.BodyPublishers.ofString(body))
        .build()
    val response = http.send(request, HttpResponse.BodyHandlers.ofString())
    check(response.statusCode() in 200..299) { "$method $path: ${response.statusCode()} ${response.body()}" }
    return response.body()
}

private fun setUp() {
    admin("POST", "/environments", """{"name": "mobile"}""")
    mobileKey = Json.parse(admin("POST", "/environments/mobile/keys", """{"kind": "mobile"}"""))
        .let { (it as Map<*, *>)["secret"] as String }
    serverKey = Json.parse(admin("POST", "/environments/mobile/keys", """{"kind": "server"}"""))
        .let { (it as Map<*, *>)["secret"] as String }
    val flags = mapOf(
        "new-checkout" to """{"on": true, "variants": {"on": true, "off": false}, "off_variant": "off", "fallthrough": {"variant": "on"}}""",
        "banner" to """{"on": true, "variants": {"hi": "Hello", "none": ""}, "off_variant": "none", "fallthrough": {"variant": "hi"}}""",
        "limit" to """{"on": true, "variants": {"v": 42}, "off_variant": "v", "fallthrough": {"variant": "v"}}""",
        "ratio" to """{"on": true, "variants": {"v": 0.25}, "off_variant": "v", "fallthrough": {"variant": "v"}}""",
        "theme" to """{"on": true, "variants": {"v": {"dark": true, "accent": "teal", "sizes": [12, 14.5], "logo": null}}, "off_variant": "v", "fallthrough": {"variant": "v"}}""",
        "beta" to """{"on": true, "variants": {"yes": true, "no": false}, "off_variant": "no",
                      "rules": [{"id": "de", "clauses": [{"attribute": "country", "op": "in", "values": ["de"]}], "serve": {"variant": "yes"}}],
                      "fallthrough": {"variant": "no"}}""",
    )
    for ((key, body) in flags) admin("PUT", "/environments/mobile/flags/$key", body)
}

private fun client(context: String = """{"key": "user-1", "country": "de"}""", key: String = mobileKey, endpoint: String = dev.vane.sdk.test.endpoint, cacheDir: String? = null): Vane {
    val builder = Vane.builder(endpoint, key).caPem(ca).context(context).transport(TransportPreference.TCP)
    if (cacheDir != null) builder.cacheDir(cacheDir)
    return builder.build()
}

private fun assertEq(expected: Any?, actual: Any?, what: String) {
    if (expected != actual) throw AssertionError("$what: expected <$expected>, got <$actual>")
}

private fun initializationAndTypedGetters() {
    client().use { vane ->
        vane.waitForInitialization(20_000)
        assertEq(ConnectionState.CONNECTED, vane.connectionState, "state")
        assertEq(true, vane.boolValue("new-checkout", false), "bool")
        assertEq("Hello", vane.stringValue("banner", "x"), "string")
        assertEq(42L, vane.intValue("limit", 0), "int")
        assertEq(0.25, vane.doubleValue("ratio", 0.0), "double")
        val theme = vane.jsonValue("theme", JsonValue.Null)
        val expected = JsonValue.Object(mapOf(
            "dark" to JsonValue.Bool(true),
            "accent" to JsonValue.Text("teal"),
            "sizes" to JsonValue.Array(listOf(JsonValue.Number(12.0), JsonValue.Number(14.5))),
            "logo" to JsonValue.Null,
        ))
        assertEq(expected, theme, "json, typed")
        assertEq(Json.parse("""{"accent":"teal","dark":true,"logo":null,"sizes":[12,14.5]}"""), Json.parse(vane.allFlags()["theme"]!!), "json as text")
        assertEq(JsonValue.Null, vane.jsonValue("banner", JsonValue.Null), "a string flag read as JSON is the default")
        val beta = vane.boolDetails("beta", false)
        assertEq(true, beta.value, "beta value")
        assertEq(Reason.TARGETING_MATCH, beta.reason, "beta reason")
        assertEq("yes", beta.variant, "beta variant")
        val wrongType = vane.stringDetails("new-checkout", "fallback")
        assertEq("fallback", wrongType.value, "wrong type value")
        assertEq("TYPE_MISMATCH", wrongType.errorCode, "wrong type code")
        val missing = vane.boolDetails("nope", true)
        assertEq(Pair(true, "FLAG_NOT_FOUND"), Pair(missing.value, missing.errorCode), "missing flag")
        assertEq(6, vane.allFlags().size, "allFlags")
    }
}

private fun aToggleReachesAListener() {
    client().use { vane ->
        vane.waitForInitialization(20_000)
        val seen = LinkedBlockingQueue<List<String>>()
        val handle = vane.addListener { keys -> seen.add(keys) }
        admin("POST", "/environments/mobile/flags/new-checkout/toggle", """{"on": false}""")
        val keys = seen.poll(20, TimeUnit.SECONDS) ?: throw AssertionError("no callback")
        assertEq(listOf("new-checkout"), keys, "changed keys")
        assertEq(false, vane.boolValue("new-checkout", true), "new value")
        handle.cancel()
        admin("POST", "/environments/mobile/flags/new-checkout/toggle", """{"on": true}""")
    }
}

private fun identifySwitchesUser() {
    client().use { vane ->
        vane.waitForInitialization(20_000)
        assertEq(true, vane.boolValue("beta", false), "beta for de")
        val changed = CountDownLatch(1)
        val handle = vane.addListener { keys -> if ("beta" in keys) changed.countDown() }
        vane.identify("""{"key": "user-2", "country": "fr"}""")
        if (!changed.await(20, TimeUnit.SECONDS)) throw AssertionError("no callback after identify")
        assertEq(false, vane.boolValue("beta", true), "beta for fr")
        handle.close() // releasing the handle unregisters too
        // Awaited: when it returns true the getters already answer for the new user.
        assertEq(true, runBlocking { vane.identify(ContextBuilder("user-3").string("country", "de"), 20_000) }, "identify awaited")
        assertEq(true, vane.boolValue("beta", false), "beta for de, at once")
        assertEq("user-3", vane.contextKey, "the new key")
        try {
            vane.identify("[1, 2]")
            throw AssertionError("a non-object context was accepted")
        } catch (e: VaneException.Config) {
        }
    }
}

private fun aBadKeyIsAnAuthException() {
    client(key = "vane_mob_00000000000000000000000000000000").use { vane ->
        try {
            vane.waitForInitialization(20_000)
            throw AssertionError("initialized with a bad key")
        } catch (e: VaneException.Auth) {
            check(e.reason.contains("authentication")) { e.reason }
        }
    }
}

private fun theCacheServesWhenTheServerIsDown() {
    val dir = File(env("VANE_CACHE_DIR"), "cache-${System.nanoTime()}").apply { mkdirs() }
    client(cacheDir = dir.path).use { vane -> vane.waitForInitialization(20_000) }
    // Same key and user, a server that is not there (nothing listens on port 1).
    client(endpoint = "127.0.0.1:1", cacheDir = dir.path).use { offline ->
        val d = offline.stringDetails("banner", "default")
        assertEq("Hello", d.value, "cached value")
        assertEq(Reason.CACHED, d.reason, "reason")
    }
    // A corrupt cache is ignored, not fatal.
    dir.listFiles()!!.forEach { it.writeText("{ not json") }
    client(endpoint = "127.0.0.1:1", cacheDir = dir.path).use { offline ->
        assertEq("default", offline.stringValue("banner", "default"), "no cache")
    }
}

private fun closeStopsCallbacks() {
    val vane = client()
    vane.waitForInitialization(20_000)
    val cancelled = LinkedBlockingQueue<List<String>>()
    val live = LinkedBlockingQueue<List<String>>()
    vane.addListener { cancelled.add(it) }.cancel()
    vane.addListener { live.add(it) }
    // Two changes reach the live listener; the cancelled one, registered first, got neither.
    for (on in listOf(false, true)) {
        admin("POST", "/environments/mobile/flags/banner/toggle", """{"on": $on}""")
        live.poll(20, TimeUnit.SECONDS) ?: throw AssertionError("the live listener got nothing")
    }
    assertEq(0, cancelled.size, "callbacks after cancel()")
    vane.close()
    admin("POST", "/environments/mobile/flags/banner/toggle", """{"on": false}""")
    // A third listener registered on a live client would see this change within milliseconds.
    client().use { other ->
        other.waitForInitialization(20_000)
        val seen = LinkedBlockingQueue<List<String>>()
        other.addListener { seen.add(it) }
        admin("POST", "/environments/mobile/flags/banner/toggle", """{"on": true}""")
        seen.poll(20, TimeUnit.SECONDS) ?: throw AssertionError("the control listener got nothing")
    }
    assertEq(0, live.size, "callbacks after close()")
}

private fun toggle(flag: String, on: Boolean) =
    admin("POST", "/environments/mobile/flags/$flag/toggle", """{"on": $on}""")

/** Issue 15.1: an app that drops the registration keeps its listener, through garbage collections. */
private fun aDroppedRegistrationKeepsItsListener() {
    client().use { vane ->
        vane.waitForInitialization(20_000)
        val seen = LinkedBlockingQueue<List<String>>()
        vane.addListener { seen.add(it) } // the registration is not kept
        repeat(5) {
            System.gc()
            Thread.sleep(20)
        }
        for (on in listOf(false, true)) {
            toggle("banner", on)
            seen.poll(20, TimeUnit.SECONDS) ?: throw AssertionError("the listener stopped after a GC")
        }
    }
}

/** Issue 15.3: callbacks run on one named SDK thread; a listener that throws is logged and lives on. */
private fun aThrowingListenerStaysAndOthersAreCalled() {
    client().use { vane ->
        vane.waitForInitialization(20_000)
        val threads = LinkedBlockingQueue<String>()
        val thrower = LinkedBlockingQueue<List<String>>()
        val other = LinkedBlockingQueue<List<String>>()
        vane.addListener { keys ->
            threads.add(Thread.currentThread().name)
            thrower.add(keys)
            throw IllegalStateException("an app bug")
        }
        vane.addListener { other.add(it) }
        for (on in listOf(false, true)) {
            toggle("banner", on)
            thrower.poll(20, TimeUnit.SECONDS) ?: throw AssertionError("the throwing listener was not called again")
            other.poll(20, TimeUnit.SECONDS) ?: throw AssertionError("the other listener was silenced")
        }
        assertEq(setOf("vane-sdk-callbacks"), threads.toSet(), "callback thread")
        val ui = java.util.concurrent.Executors.newSingleThreadExecutor { Thread(it, "app-main").apply { isDaemon = true } }
        Vane.builder(endpoint, mobileKey).caPem(ca).transport(TransportPreference.TCP)
            .context("""{"key": "user-1"}""").callbackExecutor(ui).build().use { onMain ->
                onMain.waitForInitialization(20_000)
                val where = LinkedBlockingQueue<String>()
                onMain.addListener { where.add(Thread.currentThread().name) }
                toggle("banner", false)
                assertEq("app-main", where.poll(20, TimeUnit.SECONDS), "the app's executor")
                toggle("banner", true)
            }
        ui.shutdown()
    }
}

/** Issue 15.5: close() is idempotent, and every later call says "closed" in the SDK's own error. */
private fun closeIsIdempotentAndLaterCallsSayClosed() {
    val vane = client()
    vane.waitForInitialization(20_000)
    vane.close()
    vane.close()
    assertEq(ConnectionState.STOPPED, vane.connectionState, "state after close")
    for ((what, call) in listOf<Pair<String, () -> Unit>>(
        "boolValue" to { vane.boolValue("banner", false) },
        "identify" to { vane.identify("""{"key": "u"}""") },
        "addListener" to { vane.addListener { } },
        "initialize" to { runBlocking { vane.initialize(10) } },
    )) {
        try {
            call()
            throw AssertionError("$what after close() did not throw")
        } catch (e: VaneException.Closed) {
            check(e.reason.contains("after close()")) { "$what: ${e.reason}" }
        }
    }
}

/** Issue 15.2: initialization returns a status and does not throw for being offline. */
private fun initializationOfflineReturnsAStatus() {
    val dir = File(env("VANE_CACHE_DIR"), "init-${System.nanoTime()}").apply { mkdirs() }
    client(cacheDir = dir.path).use { vane ->
        assertEq(InitStatus.READY, runBlocking { vane.initialize(20_000) }, "online")
        check(vane.isInitialized)
    }
    client(endpoint = "127.0.0.1:1", cacheDir = dir.path).use { offline ->
        assertEq(InitStatus.SERVING_CACHE, runBlocking { offline.initialize(300) }, "offline with a cache")
        assertEq("Hello", offline.stringValue("banner", "default"), "a cached value")
        check(!offline.isInitialized)
    }
    client(endpoint = "127.0.0.1:1").use { offline ->
        assertEq(InitStatus.TIMED_OUT, runBlocking { offline.initialize(300) }, "offline without a cache")
        assertEq("default", offline.stringValue("banner", "default"), "the default")
    }
}

/** Issue 15.9: a server key is refused by the mobile SDK, with what to do instead. */
private fun aServerKeyIsRefused() {
    try {
        client(key = serverKey).close()
        throw AssertionError("the mobile SDK took a server key")
    } catch (e: VaneException.Config) {
        check(e.reason.contains("mobile key")) { e.reason }
    }
}

/** Issue 15.8: the status says why: nothing listening is OFFLINE with the cause, not a timeout. */
private fun theStatusSaysOfflineAndWhy() {
    client(endpoint = "127.0.0.1:1").use { vane ->
        val offline = runBlocking { withTimeout(20_000) { vane.status.first { it.cause == StatusCause.OFFLINE } } }
        check(offline.lastError?.contains("refused") == true) { "the cause: $offline" }
        assertEq(ConnectionState.CONNECTING == offline.state || ConnectionState.DISCONNECTED == offline.state, true, "state ${offline.state}")
    }
    client().use { vane ->
        val live = runBlocking { withTimeout(20_000) { vane.status.first { it.cause == StatusCause.CONNECTED } } }
        assertEq(dev.vane.sdk.ffi.Transport.TCP, live.transport, "transport")
    }
}

/** Issue 15.8: a revoked key is seen in the status stream, and the values held stay served. */
private fun revocationIsSeenInTheStatusStream() {
    val created = Json.parse(admin("POST", "/environments/mobile/keys", """{"kind": "mobile"}""")) as Map<*, *>
    client(key = created["secret"] as String).use { vane ->
        vane.waitForInitialization(20_000)
        admin("DELETE", "/environments/mobile/keys/${created["id"]}")
        val revoked = runBlocking { withTimeout(20_000) { vane.status.first { it.cause == StatusCause.UNAUTHORIZED } } }
        check(revoked.lastError?.contains("revoked") == true) { "the cause: $revoked" }
        assertEq(ConnectionState.STOPPED, revoked.state, "state")
        assertEq("Hello", vane.stringValue("banner", "default"), "values held are still served")
    }
}

/** Issue 15.10: the SDK's logs reach the app: a corrupt cache is a warning the app sees. */
private fun aCorruptCacheIsAWarningTheAppSees() {
    val lines = LinkedBlockingQueue<Triple<LogLevel, String, String>>()
    check(Vane.setLogger(LogLevel.WARN) { level, target, message -> lines.add(Triple(level, target, message)) })
    val dir = File(env("VANE_CACHE_DIR"), "logs-${System.nanoTime()}").apply { mkdirs() }
    client(cacheDir = dir.path).use { it.waitForInitialization(20_000) }
    dir.listFiles()!!.forEach { it.writeText("{ not json") }
    client(endpoint = "127.0.0.1:1", cacheDir = dir.path).use { }
    val deadline = System.nanoTime() + 20_000_000_000
    var seen: Triple<LogLevel, String, String>? = null
    while (seen == null && System.nanoTime() < deadline) {
        val line = lines.poll(1, TimeUnit.SECONDS) ?: continue
        if (line.third.contains("corrupt flag cache")) seen = line
    }
    seen ?: throw AssertionError("no warning about the corrupt cache")
    assertEq(LogLevel.WARN, seen.first, "level")
    check(seen.second.startsWith("vane_core")) { seen.second }
    check(seen.third.contains("path=")) { "fields: ${seen.third}" }
    Vane.setLogger(LogLevel.WARN) { _, _, _ -> }
}

/** Issue 15.6: typed contexts, and an anonymous user keeps one key across starts. */
private fun typedContextsAndAKeptAnonymousKey() {
    val typed = ContextBuilder("user-1").string("country", "de").number("age", 30.0).bool("beta", true)
    Vane.builder(endpoint, mobileKey).caPem(ca).transport(TransportPreference.TCP).context(typed).build().use { vane ->
        vane.waitForInitialization(20_000)
        assertEq(true, vane.boolValue("beta", false), "the typed attribute decides the rule")
        assertEq("user-1", vane.contextKey, "the key")
    }
    val dir = File(env("VANE_CACHE_DIR"), "anon-${System.nanoTime()}").path
    val first = client(context = "{}", cacheDir = dir).use { it.contextKey }
    check(first?.startsWith("anon-") == true) { "an anonymous key: $first" }
    val again = client(context = ContextBuilder(null).string("country", "fr").build(), cacheDir = dir).use { vane ->
        vane.waitForInitialization(20_000)
        assertEq(false, vane.boolValue("beta", true), "attributes still apply")
        vane.contextKey
    }
    assertEq(first, again, "the anonymous key is kept across starts")
    val elsewhere = client(context = "{}", cacheDir = File(env("VANE_CACHE_DIR"), "anon2-${System.nanoTime()}").path).use { it.contextKey }
    check(elsewhere != first) { "another device, another key" }
}

private fun thePlatformTrustStoreIsTheDefault() {
    // run-tests puts the server's CA in the JVM's SSL_CERT_FILE, the system CA bundle of this
    // host: a client given no caPem must trust it through the platform's store.
    check(System.getenv("SSL_CERT_FILE") != null) { "run-tests sets SSL_CERT_FILE" }
    Vane.builder(endpoint, mobileKey).context("""{"key": "user-1"}""").transport(TransportPreference.TCP).build().use { vane ->
        assertEq(InitStatus.READY, runBlocking { vane.initialize(20_000) }, "trusted through the platform's store")
        assertEq(true, vane.boolValue("new-checkout", false), "values")
    }
    // And it verifies: a name the certificate does not carry is refused, and the status says why.
    Vane.builder(endpoint, mobileKey).context("""{"key": "user-1"}""").transport(TransportPreference.TCP)
        .serverName("flags.example.com").build().use { vane ->
            val refused = runBlocking { withTimeout(20_000) { vane.status.first { it.lastError != null } } }
            check("certificate" in refused.lastError!!) { "the status names the certificate: $refused" }
            assertEq(false, vane.isInitialized, "never connected")
        }
    try {
        Vane.builder(endpoint, mobileKey).caPem(" ").build().close()
        throw AssertionError("an empty CA PEM was taken")
    } catch (e: VaneException.Config) {
        check("empty" in e.reason) { e.reason }
    }
}

/** Not a test: how long one boolValue takes through the bindings (docs/BENCHMARKS.md). */
private fun measureBoolValue() {
    client().use { vane ->
        vane.waitForInitialization(20_000)
        repeat(200_000) { vane.boolValue("new-checkout", false) } // warm up the JIT
        val n = 1_000_000
        val start = System.nanoTime()
        var yes = 0
        repeat(n) { if (vane.boolValue("new-checkout", false)) yes++ }
        val ns = (System.nanoTime() - start).toDouble() / n
        println("measure: Vane.boolValue (Kotlin snapshot): %.0f ns per call (%d calls)".format(ns, n))
        check(yes == n)
        val m = 20_000
        val directStart = System.nanoTime()
        repeat(m) { if (vane.detailsDirect("new-checkout").value != null) yes++ }
        val direct = (System.nanoTime() - directStart).toDouble() / m
        println("measure: one FFI crossing with a String argument (detailsDirect, JNA): %.0f ns per call (%d calls)".format(direct, m))
        // The same crossing with no argument and a plain bool back: what the call itself costs,
        // without a string to marshal.
        val bare = System.nanoTime()
        repeat(m) { if (vane.isInitialized) yes++ }
        val plain = (System.nanoTime() - bare).toDouble() / m
        println("measure: one FFI crossing without arguments (isInitialized, JNA): %.0f ns per call (%d calls)".format(plain, m))
        // From the server's commit of a change to the getter answering it: one crossing per change
        // brings the new values (FlagUpdate), and the getter reads them from the snapshot.
        val delays = ArrayList<Double>()
        var on = vane.boolValue("new-checkout", false)
        repeat(20) {
            on = !on
            val answer = Json.parse(admin("POST", "/environments/mobile/flags/new-checkout/toggle", """{"on": $on}""")) as Map<*, *>
            val committed = (answer["committed_at_ns"] as String).toBigInteger()
            val deadline = System.nanoTime() + 20_000_000_000
            while (vane.boolValue("new-checkout", !on) != on) {
                check(System.nanoTime() < deadline) { "the change did not arrive" }
                Thread.onSpinWait()
            }
            val now = java.time.Instant.now().let { it.epochSecond.toBigInteger() * 1_000_000_000.toBigInteger() + it.nano.toBigInteger() }
            delays.add((now - committed).toDouble() / 1e6)
        }
        delays.sort()
        println("measure: commit to getter (one FlagUpdate crossing per change): median %.2f ms, max %.2f ms (%d changes)".format(delays[delays.size / 2], delays.last(), delays.size))
    }
}

fun main() {
    setUp()
    val tests = listOf(
        "initialization and typed getters" to ::initializationAndTypedGetters,
        "a toggle reaches a listener" to ::aToggleReachesAListener,
        "identify switches user" to ::identifySwitchesUser,
        "a bad key is VaneException.Auth" to ::aBadKeyIsAnAuthException,
        "the cache serves when the server is down" to ::theCacheServesWhenTheServerIsDown,
        "close() stops callbacks" to ::closeStopsCallbacks,
        "a dropped registration keeps its listener" to ::aDroppedRegistrationKeepsItsListener,
        "a throwing listener stays, others are called" to ::aThrowingListenerStaysAndOthersAreCalled,
        "close() is idempotent; later calls say closed" to ::closeIsIdempotentAndLaterCallsSayClosed,
        "initialization offline returns a status" to ::initializationOfflineReturnsAStatus,
        "a server key is refused" to ::aServerKeyIsRefused,
        "the status says offline and why" to ::theStatusSaysOfflineAndWhy,
        "revocation is seen in the status stream" to ::revocationIsSeenInTheStatusStream,
        "a corrupt cache is a warning the app sees" to ::aCorruptCacheIsAWarningTheAppSees,
        "typed contexts and a kept anonymous key" to ::typedContextsAndAKeptAnonymousKey,
        "the platform trust store is the default" to ::thePlatformTrustStoreIsTheDefault,
    )
    var passed = 0
    var failed = 0
    for ((name, test) in tests) {
        try {
            test()
            println("PASS $name")
            passed++
        } catch (e: Throwable) {
            println("FAIL $name: $e")
            e.printStackTrace()
            failed++
        }
    }
    if (failed == 0) measureBoolValue()
    println("$passed passed, $failed failed")
    exitProcess(if (failed == 0) 0 else 1)
}

/** Just enough JSON for the tests: objects, arrays, strings, numbers (as Double), booleans, null. */
object Json {
    fun parse(text: String): Any? = Parser(text).run { val v = value(); skip(); check(i == s.length) { "trailing text at $i" }; v }

    fun write(v: Any?): String = when (v) {
        null -> "null"
        is String -> "\"" + v.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n") + "\""
        is Double -> if (v == Math.floor(v) && Math.abs(v) < 1e15) v.toLong().toString() else v.toString()
        is Boolean -> v.toString()
        is Map<*, *> -> v.entries.joinToString(",", "{", "}") { write(it.key as String) + ":" + write(it.value) }
        is List<*> -> v.joinToString(",", "[", "]") { write(it) }
        else -> error("cannot write $v")
    }

    private class Parser(val s: String) {
        var i = 0
        fun skip() { while (i < s.length && s[i].isWhitespace()) i++ }
        fun value(): Any? {
            skip()
            return when (s[i]) {
                '{' -> { i++; val m = LinkedHashMap<String, Any?>(); skip()
                    if (s[i] == '}') { i++; return m }
                    while (true) { skip(); val k = string(); skip(); check(s[i++] == ':'); m[k] = value(); skip()
                        if (s[i++] == '}') return m }
                    @Suppress("UNREACHABLE_CODE") m }
                '[' -> { i++; val l = ArrayList<Any?>(); skip()
                    if (s[i] == ']') { i++; return l }
                    while (true) { l.add(value()); skip(); if (s[i++] == ']') return l }
                    @Suppress("UNREACHABLE_CODE") l }
                '"' -> string()
                't' -> { i += 4; true }
                'f' -> { i += 5; false }
                'n' -> { i += 4; null }
                else -> { val start = i; while (i < s.length && s[i] in "+-0123456789.eE") i++; s.substring(start, i).toDouble() }
            }
        }
        fun string(): String {
            check(s[i++] == '"')
            val b = StringBuilder()
            while (s[i] != '"') {
                if (s[i] == '\\') { i++
                    when (s[i]) { 'n' -> b.append('\n'); 't' -> b.append('\t'); 'u' -> { b.append(s.substring(i + 1, i + 5).toInt(16).toChar()); i += 4 }
                        else -> b.append(s[i]) }
                } else b.append(s[i])
                i++
            }
            i++
            return b.toString()
        }
    }
}
