// The flag editor: variants, the off variant, the fallthrough, and rules with clauses, each
// served by a variant or a percentage rollout. Every input carries `data-field`, the JSON path
// the API names when it refuses a definition (`rules[0].clauses[1].values`), so the API's
// error is shown at the field it concerns.

const OPERATORS = [
  "in", "starts_with", "ends_with", "contains", "matches", "lt", "lte", "gt", "gte",
  "semver_eq", "semver_lt", "semver_gt", "before", "after", "in_segment",
];

let ids = 0;
const id = (p) => `${p}-${++ids}`;

/** A clause value as typed: JSON if it parses (a number, `true`), else the text itself. */
function parseValue(text) {
  const t = text.trim();
  try {
    return JSON.parse(t);
  } catch {
    return t;
  }
}

const showValue = (v) => (typeof v === "string" ? v : JSON.stringify(v));

export function flagEditor({ flag, h, save, remove }) {
  const f = flag ?? {
    key: "",
    on: true,
    variants: { on: true, off: false },
    off_variant: "off",
    fallthrough: { variant: "on" },
    rules: [],
    tags: [],
    description: "",
  };
  const errors = h("div", { class: "error", role: "alert", hidden: true });
  const field = (label, input, path, hint) => {
    const inputId = input.id || id("f");
    input.id = inputId;
    if (path !== undefined) input.dataset.field = path;
    return h("div", { class: "field" }, h("label", { for: inputId }, label), hint && h("p", { class: "hint" }, hint), input);
  };

  // Variants: name and JSON value rows.
  const variantRows = h("div", { class: "variants" });
  const addVariant = (name = "", value = "") => {
    const nameInput = h("input", { class: "variant-name", value: name, required: true, "aria-label": "Variant name" });
    const valueInput = h("input", { class: "variant-value", value: value === "" ? "" : JSON.stringify(value), required: true, "aria-label": "Variant value (JSON)" });
    const sync = () => (valueInput.dataset.field = `variants.${nameInput.value}`);
    nameInput.addEventListener("input", () => { sync(); refreshChoices(); });
    sync();
    const row = h("div", { class: "row variant" }, nameInput, valueInput, h("button", { type: "button", class: "small", onclick: () => { row.remove(); refreshChoices(); } }, "Remove", h("span", { class: "sr" }, " variant")));
    variantRows.append(row);
  };
  for (const [name, value] of Object.entries(f.variants)) addVariant(name, value);
  const variantNames = () => [...variantRows.querySelectorAll(".variant-name")].map((i) => i.value).filter(Boolean);

  // A "serve": a variant, or a rollout of weights in percent.
  const selects = [];
  const serveEditor = (serve, path, label) => {
    const mode = h("select", { "aria-label": `${label}: serve` }, h("option", { value: "variant" }, "a variant"), h("option", { value: "rollout" }, "a percentage rollout"));
    const variant = h("select", { "aria-label": `${label}: variant`, dataset: { field: `${path}.variant` } });
    selects.push({ el: variant, value: serve?.variant });
    const weights = h("div", { class: "weights", tabindex: "-1", dataset: { field: `${path}.rollout.variants` } });
    const bucketBy = h("input", { "aria-label": `${label}: bucket by attribute`, placeholder: "key", value: serve?.rollout?.bucket_by ?? "", dataset: { field: `${path}.rollout.bucket_by` } });
    const rolloutBox = h("div", { class: "rollout" }, weights, h("label", {}, "Bucket by ", bucketBy));
    const drawWeights = () => {
      const prior = Object.fromEntries([...weights.querySelectorAll("input")].map((i) => [i.dataset.variant, i.value]));
      const initial = Object.fromEntries((serve?.rollout?.variants ?? []).map((w) => [w.variant, String(w.weight / 1000)]));
      weights.replaceChildren(
        ...variantNames().map((n) =>
          h("label", { class: "inline" }, `${n} `, h("input", { type: "number", min: 0, max: 100, step: "0.001", value: prior[n] ?? initial[n] ?? "0", dataset: { variant: n }, "aria-label": `${label}: percent for ${n}` }), " %"),
        ),
      );
    };
    const show = () => {
      variant.hidden = mode.value !== "variant";
      rolloutBox.hidden = mode.value !== "rollout";
    };
    mode.value = serve?.rollout ? "rollout" : "variant";
    mode.addEventListener("change", show);
    show();
    const read = () => {
      if (mode.value === "variant") return { variant: variant.value };
      const variants = [...weights.querySelectorAll("input")].map((i) => ({ variant: i.dataset.variant, weight: Math.round(Number(i.value) * 1000) }));
      const rollout = { variants };
      if (bucketBy.value.trim()) rollout.bucket_by = bucketBy.value.trim();
      if (serve?.rollout?.salt) rollout.salt = serve.rollout.salt;
      return { rollout };
    };
    return { el: h("div", { class: "serve" }, mode, variant, rolloutBox), read, drawWeights };
  };
  const serves = [];

  const offVariant = h("select", {});
  selects.push({ el: offVariant, value: f.off_variant });
  const fallthrough = serveEditor(f.fallthrough, "fallthrough", "Fallthrough");
  serves.push(fallthrough);

  // Rules.
  const ruleList = h("ol", { class: "rules" });
  const addRule = (rule = { clauses: [{ attribute: "key", op: "in", values: [] }], serve: { variant: variantNames()[0] ?? "" } }) => {
    const item = h("li", { class: "card rule" });
    const index = () => [...ruleList.children].indexOf(item);
    const ruleId = h("input", { value: rule.id ?? "", "aria-label": "Rule id" });
    const description = h("input", { value: rule.description ?? "", "aria-label": "Rule description" });
    const clauses = h("div", { class: "clauses" });
    const addClause = (c = { attribute: "", op: "in", values: [] }) => {
      const attribute = h("input", { class: "attribute", value: c.attribute ?? "", placeholder: "key", "aria-label": "Attribute" });
      const op = h("select", { class: "op", "aria-label": "Operator" }, OPERATORS.map((o) => h("option", { value: o }, o)));
      op.value = c.op;
      const values = h("input", { class: "values", value: (c.values ?? []).map(showValue).join(", "), "aria-label": "Values, comma-separated" });
      const negate = h("input", { type: "checkbox", class: "negate", checked: !!c.negate, "aria-label": "Negate" });
      const row = h("div", { class: "row clause" }, attribute, op, values, h("label", { class: "inline" }, negate, " not"), h("button", { type: "button", class: "small", onclick: () => { row.remove(); renumber(); } }, "Remove", h("span", { class: "sr" }, " clause")));
      clauses.append(row);
      renumber();
    };
    const serve = serveEditor(rule.serve, "rules[0].serve", "Rule");
    serves.push(serve);
    const renumber = () => {
      const i = index();
      [...clauses.children].forEach((row, j) => {
        row.querySelector(".attribute").dataset.field = `rules[${i}].clauses[${j}].attribute`;
        row.querySelector(".op").dataset.field = `rules[${i}].clauses[${j}].op`;
        row.querySelector(".values").dataset.field = `rules[${i}].clauses[${j}].values`;
      });
      clauses.dataset.field = `rules[${i}].clauses`;
      for (const el of serve.el.querySelectorAll("[data-field]")) {
        el.dataset.field = el.dataset.field.replace(/^rules\[\d+\]/, `rules[${i}]`);
      }
    };
    item._renumber = renumber;
    item._read = () => {
      const r = {
        clauses: [...clauses.children].map((row) => ({
          attribute: row.querySelector(".attribute").value.trim() || "key",
          op: row.querySelector(".op").value,
          values: row.querySelector(".values").value.split(",").map((v) => v.trim()).filter(Boolean).map(parseValue),
          negate: row.querySelector(".negate").checked,
        })),
        serve: serve.read(),
      };
      if (ruleId.value.trim()) r.id = ruleId.value.trim();
      if (description.value.trim()) r.description = description.value.trim();
      return r;
    };
    item.append(
      h("div", { class: "row" }, h("label", {}, "Id ", ruleId), h("label", {}, "Description ", description)),
      h("p", { class: "hint" }, "When all of these hold:"),
      clauses,
      h("button", { type: "button", class: "small", onclick: () => addClause() }, "Add clause"),
      h("p", { class: "hint" }, "serve"),
      serve.el,
      h("button", { type: "button", class: "danger small", onclick: () => { item.remove(); [...ruleList.children].forEach((li) => li._renumber()); } }, "Remove rule"),
    );
    ruleList.append(item);
    for (const c of rule.clauses ?? []) addClause(c);
    renumber();
    serve.drawWeights();
    refreshChoices();
  };

  // Variant choices follow the variant rows.
  function refreshChoices() {
    const names = variantNames();
    for (const s of selects) {
      const current = s.el.value || s.value;
      s.el.replaceChildren(...names.map((n) => new Option(n, n)));
      if (names.includes(current)) s.el.value = current;
      s.value = undefined;
    }
    for (const s of serves) s.drawWeights();
  }

  const key = h("input", { required: true, value: f.key, readonly: flag ? true : undefined, pattern: "[A-Za-z0-9._\\-]+" });
  const on = h("input", { type: "checkbox", checked: f.on });
  const description = h("input", { value: f.description ?? "" });
  const tags = h("input", { value: (f.tags ?? []).join(", "), placeholder: "web, checkout" });

  const read = () => {
    const variants = {};
    for (const row of variantRows.children) {
      const name = row.querySelector(".variant-name").value.trim();
      const text = row.querySelector(".variant-value").value;
      try {
        variants[name] = JSON.parse(text);
      } catch {
        throw { field: `variants.${name}`, message: `variants.${name}: the value is not JSON (a string needs quotes)` };
      }
    }
    return {
      key: key.value.trim(),
      on: on.checked,
      description: description.value,
      tags: tags.value.split(",").map((t) => t.trim()).filter(Boolean),
      variants,
      off_variant: offVariant.value,
      fallthrough: fallthrough.read(),
      rules: [...ruleList.children].map((li) => li._read()),
    };
  };

  const clearErrors = () => {
    errors.hidden = true;
    for (const el of form.querySelectorAll("[aria-invalid]")) {
      el.removeAttribute("aria-invalid");
      el.removeAttribute("aria-describedby");
    }
    for (const el of form.querySelectorAll(".field-error")) el.remove();
  };

  // The input the API's field path names, or the nearest one that holds it.
  const showError = (path, message) => {
    errors.textContent = message;
    errors.hidden = false;
    let target = null;
    for (let p = path ?? ""; p && !target; p = p.replace(/(\.[^.[\]]*|\[\d+\])$/, "")) {
      target = form.querySelector(`[data-field="${CSS.escape(p)}"]`);
      if (p === p.replace(/(\.[^.[\]]*|\[\d+\])$/, "")) break;
    }
    if (!target) return errors.focus?.();
    const errId = id("err");
    target.setAttribute("aria-invalid", "true");
    target.setAttribute("aria-describedby", errId);
    target.after(h("p", { class: "field-error", id: errId }, message));
    target.focus();
  };

  const form = h(
    "form",
    {
      class: "editor",
      novalidate: true,
      onsubmit: async (ev) => {
        ev.preventDefault();
        clearErrors();
        let definition;
        try {
          definition = read();
        } catch (e) {
          return showError(e.field, e.message);
        }
        try {
          await save(definition);
        } catch (e) {
          showError(e.field, e.field ? `${e.message}` : `${e.message} (${e.code ?? "error"})`);
        }
      },
    },
    errors,
    h(
      "fieldset",
      {},
      h("legend", {}, "Flag"),
      field("Key", key, "key"),
      h("div", { class: "field" }, on, h("label", { class: "inline", for: (on.id = id("on")) }, " On")),
      field("Description", description, "description"),
      field("Tags (comma-separated)", tags, "tags"),
    ),
    h("fieldset", {}, h("legend", {}, "Variants"), h("p", { class: "hint" }, 'Name, and value as JSON: true, "text", 3, {"a": 1}'), variantRows, h("button", { type: "button", onclick: () => { addVariant(); refreshChoices(); } }, "Add variant")),
    h("fieldset", {}, h("legend", {}, "When off"), field("Serve", offVariant, "off_variant")),
    h("fieldset", {}, h("legend", {}, "Rules, in order: the first whose clauses all hold decides"), ruleList, h("button", { type: "button", onclick: () => addRule() }, "Add rule")),
    h("fieldset", { dataset: { field: "fallthrough" } }, h("legend", {}, "When no rule matches"), fallthrough.el),
    h("div", { class: "row" }, h("button", { type: "submit" }, "Save flag"), flag && h("button", { type: "button", class: "danger", onclick: () => remove(flag.key).catch((e) => showError(undefined, e.message)) }, "Delete flag")),
  );
  for (const r of f.rules ?? []) addRule(r);
  refreshChoices();
  return form;
}
