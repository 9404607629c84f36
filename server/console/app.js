// The Vane console: plain ES modules, served by the `vane` binary itself, talking to the admin
// API with the token it was signed in with. Pages are chosen by the URL's hash.

import { api, ApiError, seg, setToken, stream, token } from "./api.js";
import { flagEditor } from "./flag-editor.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const status = document.getElementById("status");

/** Makes an element: `h("button", {type: "button", onclick}, "Save")`. Text is never HTML. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function say(message) {
  status.textContent = message;
}

/** Shows an error where the page shows errors (its `role=alert` box). */
export function fail(box, e) {
  box.textContent = e instanceof ApiError ? `${e.message} (${e.code})` : e instanceof Error ? e.message : String(e);
  box.hidden = false;
}

/** The JSON typed into `input`; what is not JSON throws, naming `what`. */
function jsonOf(input, what) {
  try {
    return JSON.parse(input.value || "{}");
  } catch (e) {
    throw new Error(`the ${what} is not JSON: ${e.message}`);
  }
}

/** A "Revoke" button for `name` (its accessible name says which): asks `question`, then runs
 *  `action`, showing what it throws in `box`. */
function revokeButton(name, question, box, action) {
  return h(
    "button",
    {
      type: "button",
      class: "danger",
      onclick: async () => {
        if (!confirm(question)) return;
        try {
          await action();
        } catch (e) {
          fail(box, e);
        }
      },
    },
    "Revoke",
    h("span", { class: "sr" }, ` ${name}`),
  );
}

/** A form's submit handler: runs `action`, and shows what it throws in `box`. */
function submitting(box, action) {
  return async (ev) => {
    ev.preventDefault();
    box.hidden = true;
    try {
      await action();
    } catch (e) {
      fail(box, e);
    }
  };
}

let leaving = null; // aborts the live stream of the page being left

function page(title, ...content) {
  main.replaceChildren(h("h1", {}, title), ...content);
  document.title = `${title} · Vane`;
  main.focus();
}

function envTabs(env, current) {
  const tabs = [
    ["flags", "Flags"],
    ["segments", "Segments"],
    ["keys", "SDK keys"],
    ["evaluate", "Evaluate"],
    ["live", "Live"],
    ["audit", "Audit log"],
  ];
  return h(
    "nav",
    { class: "tabs", "aria-label": `Environment ${env}` },
    tabs.map(([id, label]) =>
      h("a", { href: `#/env/${seg(env)}/${id}`, "aria-current": id === current ? "page" : undefined }, label),
    ),
  );
}

// ---------------------------------------------------------------------------------------------
// Sign in

function signIn(message) {
  nav.replaceChildren();
  const error = h("p", { class: "error", role: "alert", hidden: !message }, message ?? "");
  const input = h("input", { id: "token", type: "password", autocomplete: "current-password", required: true });
  const form = h(
    "form",
    {
      class: "card narrow",
      onsubmit: async (ev) => {
        ev.preventDefault();
        setToken(input.value.trim());
        try {
          await api("GET", "/environments");
          location.hash = "#/";
          route();
        } catch (e) {
          setToken(null);
          fail(error, e);
        }
      },
    },
    h("label", { for: "token" }, "Admin token"),
    h("p", { class: "hint" }, "The server's admin-token file, or a named token from `vane token create`."),
    input,
    error,
    h("button", { type: "submit" }, "Sign in"),
  );
  page("Sign in", form);
  input.focus();
}

function topNav() {
  nav.replaceChildren(
    h("a", { href: "#/" }, "Environments"),
    h("a", { href: "#/tokens" }, "Admin tokens"),
    h("button", { type: "button", class: "link", onclick: () => { setToken(null); signIn(); } }, "Sign out"),
  );
}

// ---------------------------------------------------------------------------------------------
// Environments

function progressBar(copied, total, label) {
  return h("progress", { max: total || 1, value: copied, "aria-label": label }, `${copied} of ${total}`);
}

async function environments() {
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const list = h("tbody");
  const table = h(
    "table",
    {},
    h("caption", {}, "Environments"),
    h("thead", {}, h("tr", {}, ["Name", "State", "Version", "Flags", ""].map((c) => h("th", { scope: "col" }, c)))),
    list,
  );
  const sources = h("select", { id: "clone-source", required: true });
  const name = h("input", { id: "new-env", required: true, pattern: "[A-Za-z0-9._\\-]+", maxlength: 128 });
  const cloneName = h("input", { id: "clone-name", required: true, pattern: "[A-Za-z0-9._\\-]+", maxlength: 128 });
  const create = h(
    "form",
    {
      class: "card",
      onsubmit: submitting(error, async () => {
        await api("POST", "/environments", { name: name.value });
        say(`created ${name.value}`);
        name.value = "";
        await refresh();
      }),
    },
    h("h2", {}, "New environment"),
    h("label", { for: "new-env" }, "Name"),
    name,
    h("button", { type: "submit" }, "Create"),
  );
  const clone = h(
    "form",
    {
      class: "card",
      onsubmit: submitting(error, async () => {
        const job = await api("POST", `/environments/${seg(sources.value)}/clone`, { name: cloneName.value, async: true });
        say(`cloning ${job.source} into ${job.target}`);
        cloneName.value = "";
        await refresh();
        follow(job.id);
      }),
    },
    h("h2", {}, "Clone an environment"),
    h("p", { class: "hint" }, "Copies flags and segments (not keys). The copy is served once it is complete."),
    h("label", { for: "clone-source" }, "From"),
    sources,
    h("label", { for: "clone-name" }, "New name"),
    cloneName,
    h("button", { type: "submit" }, "Clone"),
  );
  let timer = null;
  // A clone's progress: its job, read until it ends.
  const follow = (id) => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      if (!main.contains(table)) return;
      const job = await api("GET", `/jobs/${seg(id)}`).catch(() => null);
      await refresh();
      if (job?.state === "running") follow(id);
      else if (job) say(job.state === "done" ? `${job.target} is ready` : `cloning ${job.target} failed: ${job.error}`);
    }, 250);
  };
  const refresh = async () => {
    const { environments } = await api("GET", "/environments");
    sources.replaceChildren(...environments.filter((e) => e.state === "ready").map((e) => h("option", { value: e.name }, e.name)));
    list.replaceChildren(
      ...environments.map((e) => {
        const state =
          e.state === "creating"
            ? h("span", {}, "creating ", progressBar(e.progress?.copied ?? 0, e.progress?.total ?? 0, `${e.name}: copied`), ` ${e.progress?.copied ?? 0}/${e.progress?.total ?? 0}`)
            : e.state === "failed"
              ? h("span", { class: "bad", title: e.error ?? "" }, `failed: ${e.error ?? ""}`)
              : h("span", { class: "good" }, "ready");
        if (e.state === "creating" && e.job) follow(e.job);
        return h(
          "tr",
          { dataset: { env: e.name, state: e.state } },
          h("th", { scope: "row" }, h("a", { href: `#/env/${seg(e.name)}/flags` }, e.name)),
          h("td", {}, state),
          h("td", {}, e.version),
          h("td", {}, e.flags),
          h("td", {}, h("button", { type: "button", class: "danger", onclick: () => remove(e.name) }, "Delete", h("span", { class: "sr" }, ` ${e.name}`))),
        );
      }),
    );
  };
  const remove = async (env) => {
    const typed = prompt(`Delete ${env} with its flags, segments and keys? Its clients are disconnected. Type its name to confirm.`);
    if (typed !== env) return say("not deleted");
    try {
      await api("DELETE", `/environments/${seg(env)}`);
      say(`deleted ${env}`);
      await refresh();
    } catch (e) {
      fail(error, e);
    }
  };
  page("Environments", error, table, h("div", { class: "row" }, create, clone));
  await refresh();
}

// ---------------------------------------------------------------------------------------------
// Flags

async function flags(env) {
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const search = h("input", { id: "search", type: "search", placeholder: "key, description or tag" });
  const tag = h("select", { id: "tag" }, h("option", { value: "" }, "any tag"));
  const list = h("tbody");
  let all = [];
  const show = () => {
    const q = search.value.trim().toLowerCase();
    const rows = all.filter(
      (f) =>
        (!tag.value || (f.tags ?? []).includes(tag.value)) &&
        (!q || f.key.toLowerCase().includes(q) || (f.description ?? "").toLowerCase().includes(q) || (f.tags ?? []).some((t) => t.includes(q))),
    );
    list.replaceChildren(
      ...rows.map((f) =>
        h(
          "tr",
          { dataset: { flag: f.key } },
          h("th", { scope: "row" }, h("a", { href: `#/env/${seg(env)}/flags/${seg(f.key)}` }, f.key)),
          h(
            "td",
            {},
            h(
              "button",
              {
                type: "button",
                class: "toggle",
                role: "switch",
                "aria-checked": String(f.on),
                "aria-label": `${f.key} on`,
                onclick: async (ev) => {
                  try {
                    const w = await api("POST", `/environments/${seg(env)}/flags/${seg(f.key)}/toggle`, { on: !f.on });
                    f.on = !f.on;
                    ev.target.setAttribute("aria-checked", String(f.on));
                    ev.target.textContent = f.on ? "On" : "Off";
                    say(`${f.key} ${f.on ? "on" : "off"} at version ${w.version}`);
                  } catch (e) {
                    fail(error, e);
                  }
                },
              },
              f.on ? "On" : "Off",
            ),
          ),
          h("td", {}, (f.tags ?? []).map((t) => h("span", { class: "tag" }, t))),
          h("td", {}, f.description ?? ""),
        ),
      ),
    );
  };
  search.addEventListener("input", show);
  tag.addEventListener("change", show);
  page(
    `${env}: flags`,
    envTabs(env, "flags"),
    error,
    h(
      "div",
      { class: "row filters" },
      h("div", {}, h("label", { for: "search" }, "Search"), search),
      h("div", {}, h("label", { for: "tag" }, "Tag"), tag),
      h("a", { class: "button", href: `#/env/${seg(env)}/flags/new` }, "New flag"),
    ),
    h(
      "table",
      {},
      h("caption", {}, "Flags"),
      h("thead", {}, h("tr", {}, ["Key", "State", "Tags", "Description"].map((c) => h("th", { scope: "col" }, c)))),
      list,
    ),
  );
  try {
    all = (await api("GET", `/environments/${seg(env)}/flags`)).flags;
    const tags = [...new Set(all.flatMap((f) => f.tags ?? []))].sort();
    tag.append(...tags.map((t) => h("option", { value: t }, t)));
    show();
  } catch (e) {
    fail(error, e);
  }
}

async function flagPage(env, key) {
  const isNew = key === "new";
  let flag = null;
  if (!isNew) {
    try {
      flag = await api("GET", `/environments/${seg(env)}/flags/${seg(key)}`);
    } catch (e) {
      const error = h("p", { class: "error", role: "alert" });
      fail(error, e);
      return page(`${env}: ${key}`, envTabs(env, "flags"), error);
    }
  }
  const editor = flagEditor({
    flag,
    h,
    save: async (definition) => {
      const w = await api("PUT", `/environments/${seg(env)}/flags/${seg(definition.key)}`, definition);
      say(`saved ${definition.key} at version ${w.version}`);
      if (isNew) location.hash = `#/env/${seg(env)}/flags/${seg(definition.key)}`;
    },
    remove: async (k) => {
      if (!confirm(`Delete flag ${k}? Clients fall back to their defaults.`)) return;
      await api("DELETE", `/environments/${seg(env)}/flags/${seg(k)}`);
      say(`deleted ${k}`);
      location.hash = `#/env/${seg(env)}/flags`;
    },
  });
  page(isNew ? `${env}: new flag` : `${env}: ${key}`, envTabs(env, "flags"), editor);
}

// ---------------------------------------------------------------------------------------------
// Segments

async function segments(env, key) {
  const error = h("p", { class: "error", role: "alert", hidden: true, id: "segment-error" });
  const list = h("ul", { class: "plain" });
  const keyInput = h("input", { id: "segment-key", required: true, pattern: "[A-Za-z0-9._\\-]+" });
  const body = h("textarea", { id: "segment-body", rows: 10, spellcheck: "false", dataset: { field: "" } });
  const load = async (k) => {
    const s = await api("GET", `/environments/${seg(env)}/segments/${seg(k)}`);
    keyInput.value = s.key;
    delete s.key;
    delete s.version;
    body.value = JSON.stringify(s, null, 2);
  };
  const form = h(
    "form",
    {
      class: "card",
      onsubmit: submitting(error, async () => {
        body.removeAttribute("aria-invalid");
        const definition = jsonOf(body, "definition");
        try {
          const w = await api("PUT", `/environments/${seg(env)}/segments/${seg(keyInput.value)}`, definition);
          say(`saved ${keyInput.value} at version ${w.version}`);
          await refresh();
        } catch (e) {
          // The definition is one field here: mark it (the error names the path).
          if (e.field !== undefined) {
            body.setAttribute("aria-invalid", "true");
            body.setAttribute("aria-describedby", error.id);
            body.focus();
          }
          throw e;
        }
      }),
    },
    h("h2", {}, "Segment"),
    h("p", { class: "hint" }, 'JSON as in docs/FLAGS.md: {"included": [...], "excluded": [...], "rules": [{"clauses": [...]}]}'),
    h("label", { for: "segment-key" }, "Key"),
    keyInput,
    h("label", { for: "segment-body" }, "Definition"),
    body,
    h("button", { type: "submit" }, "Save segment"),
  );
  const refresh = async () => {
    const { segments } = await api("GET", `/environments/${seg(env)}/segments`);
    list.replaceChildren(
      ...segments.map((s) =>
        h(
          "li",
          {},
          h("a", { href: `#/env/${seg(env)}/segments/${seg(s.key)}` }, s.key),
          " ",
          h(
            "button",
            {
              type: "button",
              class: "danger small",
              onclick: async () => {
                if (!confirm(`Delete segment ${s.key}?`)) return;
                try {
                  await api("DELETE", `/environments/${seg(env)}/segments/${seg(s.key)}`);
                  await refresh();
                } catch (e) {
                  fail(error, e);
                }
              },
            },
            "Delete",
            h("span", { class: "sr" }, ` ${s.key}`),
          ),
        ),
      ),
    );
  };
  page(`${env}: segments`, envTabs(env, "segments"), error, h("div", { class: "row" }, h("section", { class: "card" }, h("h2", {}, "Segments"), list), form));
  try {
    await refresh();
    if (key) await load(key);
  } catch (e) {
    fail(error, e);
  }
}

// ---------------------------------------------------------------------------------------------
// SDK keys

async function keys(env) {
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const list = h("tbody");
  const kind = h("select", { id: "key-kind" }, h("option", { value: "server" }, "server (rules, backend services)"), h("option", { value: "mobile" }, "mobile (values only, apps)"));
  const secret = h("div", { class: "card secret", hidden: true, role: "region", "aria-label": "New key" });
  const showRevoked = h("input", { id: "show-revoked", type: "checkbox" });
  const refresh = async () => {
    const { keys } = await api("GET", `/environments/${seg(env)}/keys`);
    list.replaceChildren(
      ...keys
        .filter((k) => showRevoked.checked || !k.revoked_at)
        .map((k) =>
          h(
            "tr",
            { dataset: { key: k.id } },
            h("th", { scope: "row" }, k.id),
            h("td", {}, k.kind),
            h("td", {}, h("code", {}, `${k.prefix}…`)),
            h("td", {}, k.revoked_at ? "revoked" : "active"),
            h(
              "td",
              {},
              !k.revoked_at &&
                revokeButton(k.id, `Revoke ${k.id}? Its sessions end at once.`, error, async () => {
                  await api("DELETE", `/environments/${seg(env)}/keys/${seg(k.id)}`);
                  say(`revoked ${k.id}`);
                  await refresh();
                }),
            ),
          ),
        ),
    );
  };
  showRevoked.addEventListener("change", refresh);
  const create = h(
    "form",
    {
      class: "card",
      onsubmit: submitting(error, async () => {
        const key = await api("POST", `/environments/${seg(env)}/keys`, { kind: kind.value });
        const value = h("input", { id: "new-secret", readonly: true, value: key.secret });
        secret.replaceChildren(
          h("h2", {}, "Copy the secret now"),
          h("p", {}, "It is shown only this once; the server keeps only its hash."),
          h("label", { for: "new-secret" }, `Secret of ${key.id}`),
          value,
          h("button", { type: "button", onclick: () => navigator.clipboard?.writeText(key.secret).then(() => say("copied")) }, "Copy"),
          h("button", { type: "button", onclick: () => { secret.hidden = true; secret.replaceChildren(); } }, "Done"),
        );
        secret.hidden = false;
        value.select();
        await refresh();
      }),
    },
    h("h2", {}, "New key"),
    h("label", { for: "key-kind" }, "Kind"),
    kind,
    h("button", { type: "submit" }, "Create key"),
  );
  page(
    `${env}: SDK keys`,
    envTabs(env, "keys"),
    error,
    secret,
    h("div", { class: "row filters" }, h("div", {}, showRevoked, h("label", { for: "show-revoked", class: "inline" }, "Show revoked keys"))),
    h("table", {}, h("caption", {}, "SDK keys"), h("thead", {}, h("tr", {}, ["Id", "Kind", "Prefix", "State", ""].map((c) => h("th", { scope: "col" }, c)))), list),
    create,
  );
  try {
    await refresh();
  } catch (e) {
    fail(error, e);
  }
}

// ---------------------------------------------------------------------------------------------
// Evaluate: why does this user get B?

async function evaluate(env) {
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const flag = h("select", { id: "eval-flag" });
  const context = h("textarea", { id: "eval-context", rows: 5, spellcheck: "false" }, '{"key": "user-1"}');
  const answer = h("dl", { class: "answer", "aria-live": "polite" });
  const form = h(
    "form",
    {
      class: "card",
      onsubmit: submitting(error, async () => {
        const context_ = jsonOf(context, "context");
        const r = await api("POST", `/environments/${seg(env)}/flags/${seg(flag.value)}/evaluate`, { context: context_ });
        const rule = r.rule ? `${r.rule.index}${r.rule.id ? ` (${r.rule.id})` : ""}` : "none";
        answer.replaceChildren(
          ...[
            ["Value", JSON.stringify(r.value)],
            ["Variant", r.variant ?? "(the caller's default)"],
            ["Reason", r.reason + (r.error_code ? ` (${r.error_code})` : "")],
            ["Deciding rule", rule],
            ["Bucket", r.bucket ?? "none"],
            ["Why", r.explanation],
            ["At version", r.version],
          ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]),
        );
      }),
    },
    h("label", { for: "eval-flag" }, "Flag"),
    flag,
    h("label", { for: "eval-context" }, "Context (JSON)"),
    context,
    h("button", { type: "submit" }, "Evaluate"),
  );
  page(`${env}: evaluate`, envTabs(env, "evaluate"), error, form, answer);
  try {
    const { flags } = await api("GET", `/environments/${seg(env)}/flags`);
    flag.replaceChildren(...flags.map((f) => h("option", { value: f.key }, f.key)));
  } catch (e) {
    fail(error, e);
  }
}

// ---------------------------------------------------------------------------------------------
// Audit log

async function audit(env) {
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const list = h("tbody");
  const more = h("button", { type: "button", hidden: true }, "Older entries");
  let before = null;
  const load = async () => {
    const page_ = await api("GET", `/environments/${seg(env)}/audit?limit=50${before ? `&before=${before}` : ""}`);
    list.append(
      ...page_.entries.map((e) =>
        h(
          "tr",
          {},
          h("td", {}, new Date(e.at_ms).toISOString().replace("T", " ").slice(0, 19)),
          h("td", {}, e.actor),
          h("td", {}, e.action),
          h("td", {}, e.target ?? ""),
          h("td", {}, h("details", {}, h("summary", {}, "before / after"), h("pre", {}, `before: ${JSON.stringify(e.before, null, 2)}\nafter: ${JSON.stringify(e.after, null, 2)}`))),
        ),
      ),
    );
    before = page_.next_before ?? null;
    more.hidden = !before;
  };
  more.addEventListener("click", () => load().catch((e) => fail(error, e)));
  page(
    `${env}: audit log`,
    envTabs(env, "audit"),
    error,
    h("table", {}, h("caption", {}, "Newest first"), h("thead", {}, h("tr", {}, ["When (UTC)", "Actor", "Action", "Target", "Change"].map((c) => h("th", { scope: "col" }, c)))), list),
    more,
  );
  try {
    await load();
  } catch (e) {
    fail(error, e);
  }
}

// ---------------------------------------------------------------------------------------------
// Live: the fleet, and each change spreading through it, pushed by the server

function curve(change) {
  const W = 320, H = 120;
  const total = Math.max(change.sessions, 1);
  const points = change.acked.length ? change.acked : [];
  const maxMs = Math.max(points.at(-1)?.[0] ?? 1, 1);
  const xy = [[0, H], ...points.map(([ms, n]) => [(ms / maxMs) * W, H - (n / total) * H])];
  const path = xy.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "curve");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `version ${change.version}: ${change.current} of ${change.sessions} sessions acknowledged within ${maxMs} ms`);
  const p = document.createElementNS("http://www.w3.org/2000/svg", "path");
  p.setAttribute("d", path);
  svg.append(p);
  return svg;
}

async function live(env) {
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const fleet = h("div", { class: "row" });
  const changes = h("div", { class: "changes" });
  const behind = h("tbody");
  page(
    `${env}: live`,
    envTabs(env, "live"),
    error,
    h("p", { class: "hint" }, "Pushed by the server as sessions connect and acknowledge."),
    fleet,
    h("h2", {}, "Changes and their acknowledgements"),
    changes,
    h("table", {}, h("caption", {}, "Sessions behind"), h("thead", {}, h("tr", {}, ["Session", "Transport", "Platform", "SDK", "Holds version"].map((c) => h("th", { scope: "col" }, c)))), behind),
  );
  const count = (title, map) =>
    h("section", { class: "card" }, h("h2", {}, title), h("ul", { class: "plain" }, Object.entries(map).map(([k, n]) => h("li", {}, `${k}: ${n}`))));
  const controller = new AbortController();
  leaving = controller;
  try {
    await stream(
      `/environments/${seg(env)}/live`,
      (name, data) => {
        if (name !== "fleet") return;
        fleet.replaceChildren(
          h("section", { class: "card" }, h("h2", {}, "Sessions"), h("p", { class: "big", id: "session-count" }, String(data.sessions)), h("p", {}, `environment at version ${data.version}`)),
          count("By transport", data.by_transport),
          count("By platform", data.by_platform),
          count("By SDK", data.by_sdk),
        );
        changes.replaceChildren(
          ...data.changes
            .slice()
            .reverse()
            .map((c) =>
              h(
                "figure",
                { class: "card change", dataset: { version: c.version } },
                curve(c),
                h("figcaption", {}, `version ${c.version}: `, h("strong", { class: "acked" }, `${c.current} of ${c.sessions}`), " sessions acknowledged", c.acked.length ? ` (last after ${c.acked.at(-1)[0]} ms)` : ""),
              ),
            ),
        );
        behind.replaceChildren(
          ...data.behind.map((s) => h("tr", {}, h("td", {}, s.session), h("td", {}, s.transport), h("td", {}, s.platform), h("td", {}, s.sdk), h("td", {}, s.acked ?? "none yet"))),
        );
      },
      controller.signal,
    );
  } catch (e) {
    if (e.name !== "AbortError") fail(error, e);
  }
}

// ---------------------------------------------------------------------------------------------
// Admin tokens

async function tokens() {
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const list = h("tbody");
  const name = h("input", { id: "token-name", required: true, pattern: "[A-Za-z0-9._\\-]+" });
  const secret = h("div", { class: "card secret", hidden: true });
  const refresh = async () => {
    const { tokens } = await api("GET", "/tokens");
    list.replaceChildren(
      ...tokens.map((t) =>
        h(
          "tr",
          {},
          h("th", { scope: "row" }, t.name),
          h("td", {}, h("code", {}, `${t.prefix}…`)),
          h("td", {}, t.revoked_at ? "revoked" : "active"),
          h(
            "td",
            {},
            !t.revoked_at &&
              revokeButton(t.name, `Revoke the admin token ${t.name}?`, error, async () => {
                await api("DELETE", `/tokens/${seg(t.name)}`);
                say(`revoked ${t.name}`);
                await refresh();
              }),
          ),
        ),
      ),
    );
  };
  const form = h(
    "form",
    {
      class: "card",
      onsubmit: submitting(error, async () => {
        const t = await api("POST", "/tokens", { name: name.value });
        const value = h("input", { id: "token-secret", readonly: true, value: t.secret });
        secret.replaceChildren(h("h2", {}, "Copy the token now"), h("p", {}, "It is shown only this once."), h("label", { for: "token-secret" }, `Token ${t.name}`), value);
        secret.hidden = false;
        name.value = "";
        await refresh();
      }),
    },
    h("h2", {}, "New admin token"),
    h("p", { class: "hint" }, "Its name is recorded in the audit log as the actor of what it does."),
    h("label", { for: "token-name" }, "Name"),
    name,
    h("button", { type: "submit" }, "Create token"),
  );
  page("Admin tokens", error, secret, h("table", {}, h("caption", {}, "Named admin tokens"), h("thead", {}, h("tr", {}, ["Name", "Prefix", "State", ""].map((c) => h("th", { scope: "col" }, c)))), list), form);
  try {
    await refresh();
  } catch (e) {
    fail(error, e);
  }
}

// ---------------------------------------------------------------------------------------------

async function route() {
  leaving?.abort();
  leaving = null;
  if (!token()) return signIn();
  topNav();
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  try {
    if (parts[0] === "env" && parts[1]) {
      const [, env, tab, key] = parts;
      if (tab === "flags" && key) return await flagPage(env, key);
      if (tab === "segments") return await segments(env, key);
      if (tab === "keys") return await keys(env);
      if (tab === "evaluate") return await evaluate(env);
      if (tab === "audit") return await audit(env);
      if (tab === "live") return await live(env);
      return await flags(env);
    }
    if (parts[0] === "tokens") return await tokens();
    return await environments();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return signIn("The token was refused; sign in again.");
    const box = h("p", { class: "error", role: "alert" });
    fail(box, e);
    main.replaceChildren(box);
  }
}

window.addEventListener("hashchange", route);
route();
