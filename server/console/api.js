// The admin API, as the console calls it: every request carries the signed-in token, and an
// error answer becomes an ApiError with the API's code, message and (for invalid definitions)
// the field at fault.

const TOKEN = "vane-console-token";

export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

export function token() {
  return localStorage.getItem(TOKEN);
}

export function setToken(value) {
  if (value) localStorage.setItem(TOKEN, value);
  else localStorage.removeItem(TOKEN);
}

export async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token() ?? ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(`/api/v1${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, "unreachable", `the server cannot be reached (${e.message})`);
  }
  const text = await response.text();
  const json = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = json?.error ?? {};
    throw new ApiError(response.status, error.code ?? "unknown", error.message ?? response.statusText, error.field);
  }
  return json;
}

export const seg = (s) => encodeURIComponent(s);

// Server-sent events over fetch (EventSource cannot send the Authorization header): calls
// `onEvent(name, data)` for each event until `signal` aborts or the stream ends.
export async function stream(path, onEvent, signal) {
  const response = await fetch(`/api/v1${path}`, {
    headers: { Authorization: `Bearer ${token() ?? ""}`, Accept: "text/event-stream" },
    signal,
  });
  if (!response.ok) {
    const json = await response.json().catch(() => ({}));
    throw new ApiError(response.status, json?.error?.code ?? "unknown", json?.error?.message ?? response.statusText);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}
