// OpenFeature's official OFREP web provider (@openfeature/ofrep-web-provider) against a running
// Vane server, under Node. Node 20 has fetch but no EventSource; the `eventsource` package is a
// standard implementation of it, put where a browser has its own.
//
//   node check.mjs BASE_URL SDK_KEY FLAG
//
// Prints one JSON line per step: {"step":"ready","value":…} once the provider is ready, then
// {"step":"changed","value":…,"flags":[…]} when a ConfigurationChanged event arrives (the test
// changes the flag after "ready"), then exits 0. Exits 1 on an error or after 30 s.
import { EventSource } from 'eventsource';
globalThis.EventSource = EventSource;

const { OpenFeature, ProviderEvents } = await import('@openfeature/web-sdk');
const { OFREPWebProvider } = await import('@openfeature/ofrep-web-provider');

const [baseUrl, key, flag] = process.argv.slice(2);
const say = (o) => console.log(JSON.stringify(o));
setTimeout(() => {
  say({ step: 'timeout' });
  process.exit(1);
}, 30_000).unref();

const provider = new OFREPWebProvider({
  baseUrl,
  headers: [['X-API-Key', key]],
  cacheMode: 'disabled',
  changeDetection: 'sse',
});
try {
  await OpenFeature.setContext({ targetingKey: 'user-1', plan: 'free' });
  await OpenFeature.setProviderAndWait(provider);
} catch (e) {
  say({ step: 'error', error: String(e) });
  process.exit(1);
}
const client = OpenFeature.getClient();
const details = client.getBooleanDetails(flag, false);
client.addHandler(ProviderEvents.ConfigurationChanged, (event) => {
  const now = client.getBooleanDetails(flag, false);
  say({ step: 'changed', value: now.value, reason: now.reason, flags: event?.flagsChanged ?? [] });
  OpenFeature.close().finally(() => process.exit(0));
});
say({ step: 'ready', value: details.value, reason: details.reason, variant: details.variant });
