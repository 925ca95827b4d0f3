/* The ranking page: drag (SortableJS) and keyboard ranking, ties, flags, skip, and the payload
 * htmx posts. The DOM order of #ranking is the ranking; a card's data-tied="true" ties it with the
 * card above. htmx swaps in the next task after a submit; init() runs again for it.
 * A revision page renders the cards in the order judged; #task's data-shown is the order shown then.
 * window.PrefloopAnnotate lets annotate-desk.js (drafts, sign-in again) read and restore the state;
 * every change fires "prefloop:changed" on the document.
 * No build step; plain ES2017. */
(function () {
  "use strict";

  var FLAG_KEYS = { h: "harmful", n: "nonsense", p: "private_data", o: "other" };
  var state = null;

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  function task() { return $("#task"); }
  function list() { return $("#ranking"); }
  function cards() { return list() ? $all("li.response", list()) : []; }
  function isArena() { var t = task(); return !!t && t.dataset.kind === "arena"; }
  function cardByLabel(label) { return cards().filter(function (c) { return c.dataset.label === String(label); })[0]; }
  function ids(items) { return items.map(function (c) { return Number(c.dataset.responseId); }); }

  function init() {
    var t = task();
    if (!t) { state = null; return; }
    state = {
      taskId: t.dataset.taskId,
      shown: t.dataset.shown ? t.dataset.shown.split(",").map(Number) : ids(cards()),
      placed: 0,
      pendingTie: false,
      pendingFlag: false,
      flagCard: null,
      warned: false,
      skip: null,
      startedAt: Date.now()
    };
    if (!isArena() && window.Sortable) {
      window.Sortable.create(list(), {
        animation: 120,
        handle: ".response-head",
        filter: "button, input, label",
        preventOnFilter: false,
        forceFallback: true, /* mouse-event dragging: the same in every browser, and scriptable */
        // A drag sets the order by hand: keyboard placement starts again from the top.
        onEnd: function () { state.warned = false; state.placed = 0; update(); }
      });
    }
    var form = $("#rank-form");
    form.addEventListener("htmx:confirm", onConfirm);
    form.addEventListener("htmx:configRequest", onConfigRequest);
    $("#skip-dialog").addEventListener("close", onSkipClose);
    $all("input[name=flag][value=other]", form).forEach(function (box) {
      box.addEventListener("change", syncFlagNote);
    });
    $all("input[name=verdict]", form).forEach(function (r) { r.addEventListener("change", update); });
    $("#all-bad").addEventListener("change", update);
    update();
  }

  // ------------------------------------------------------------ ranking state

  function groups() {
    var out = [];
    cards().forEach(function (c, i) {
      var id = Number(c.dataset.responseId);
      if (i > 0 && c.dataset.tied === "true") out[out.length - 1].push(id);
      else out.push([id]);
    });
    return out;
  }

  function update() {
    var rank = 0;
    cards().forEach(function (c, i) {
      if (i === 0) c.dataset.tied = "false";
      var tied = c.dataset.tied === "true";
      if (!tied) rank += 1;
      var badge = $(".rank-badge", c);
      if (badge) badge.textContent = "Rank " + rank + (tied ? " (tie)" : "");
      var toggle = $(".tie-toggle", c);
      if (toggle) { toggle.setAttribute("aria-pressed", tied ? "true" : "false"); toggle.disabled = i === 0; }
      c.classList.toggle("tied", tied);
      c.classList.toggle("placed", i < state.placed);
    });
    var allBad = $("#all-bad") && $("#all-bad").checked;
    if (list()) list().classList.toggle("all-bad", !!allBad);
    var warning = $("#unchanged-warning");
    if (warning) warning.hidden = !state.warned;
    status();
    changed();
  }

  function changed() { document.dispatchEvent(new CustomEvent("prefloop:changed")); }

  function status(message) {
    var el = $("#kbd-status");
    if (!el || !state) return;
    if (message) { el.textContent = message; return; }
    var parts = [];
    if (!isArena()) {
      parts.push("Order: " + groups().map(function (g) {
        return g.map(function (id) { return labelOf(id); }).join(" = ");
      }).join(" > "));
      if (state.placed > 0 && state.placed < cards().length) parts.push("placed " + state.placed + " of " + cards().length);
    }
    if (state.pendingTie) parts.push("tie: press the number to tie with the previous one");
    if (state.pendingFlag) parts.push("flag: press the number of the response");
    el.textContent = parts.join(" · ");
  }

  function labelOf(id) {
    var c = cards().filter(function (x) { return Number(x.dataset.responseId) === id; })[0];
    return c ? c.dataset.label : "?";
  }

  function place(label) {
    var card = cardByLabel(label);
    if (!card) return;
    var all = cards();
    var index = all.indexOf(card);
    if (index < state.placed) { status("Response " + label + " is already placed (Backspace undoes, R resets)."); return; }
    list().insertBefore(card, all[state.placed]);
    card.dataset.tied = state.pendingTie && state.placed > 0 ? "true" : "false";
    state.placed += 1;
    state.pendingTie = false;
    if (state.placed === all.length - 1) {
      // The last one has nowhere else to go; it is placed after the others, untied.
      var last = cards()[all.length - 1];
      last.dataset.tied = "false";
      state.placed = all.length;
    }
    state.warned = false;
    update();
  }

  function undo() {
    if (state.placed === 0) return;
    state.placed -= 1;
    cards()[state.placed].dataset.tied = "false";
    state.warned = false;
    update();
  }

  function reset() {
    var byId = {};
    cards().forEach(function (c) { byId[c.dataset.responseId] = c; c.dataset.tied = "false"; });
    state.shown.forEach(function (id) { list().appendChild(byId[id]); });
    state.placed = 0;
    state.pendingTie = false;
    state.warned = false;
    update();
  }

  // ------------------------------------------------------------ flags

  function toggleFlags(card, open) {
    var fieldset = $("fieldset.flags", card);
    var show = open === undefined ? fieldset.hidden : open;
    fieldset.hidden = !show;
    $(".flag-toggle", card).setAttribute("aria-expanded", show ? "true" : "false");
    state.flagCard = show ? card : null;
    if (show) card.focus();
  }

  function syncFlagNote() {
    var anyOther = $all("input[name=flag][value=other]").some(function (b) { return b.checked; });
    var note = $(".flag-note");
    if (note) note.hidden = !anyOther;
  }

  function flags() {
    var out = {};
    cards().forEach(function (c) {
      var names = $all("input[name=flag]:checked", c).map(function (b) { return b.value; });
      if (names.length) out[c.dataset.responseId] = names;
    });
    return out;
  }

  // ------------------------------------------------------------ payload and submit

  function field(name) { var el = $("#rank-form [name=" + name + "]"); return el ? el.value : ""; }

  function buildPayload() {
    var allBad = $("#all-bad").checked;
    var common = {
      flags: flags(),
      flag_note: field("flag_note"),
      rationale: field("rationale"),
      time_spent_ms: Math.min(Date.now() - state.startedAt, 86400000)
    };
    if (state.skip) {
      return Object.assign(common, { skip: true, skip_reason: state.skip, ranking: [] });
    }
    if (allBad) return Object.assign(common, { all_bad: true, ranking: [] });
    if (isArena()) {
      var verdict = ($("input[name=verdict]:checked") || {}).value;
      var order = ids(cards());
      var ranking = verdict === "1" ? [[order[0]], [order[1]]]
        : verdict === "2" ? [[order[1]], [order[0]]]
        : verdict === "tie" ? [[order[0], order[1]]] : [];
      return Object.assign(common, { ranking: ranking });
    }
    return Object.assign(common, { ranking: groups() });
  }

  function unchangedOrder() {
    var g = groups();
    if (g.some(function (x) { return x.length > 1; })) return false;
    var now = ids(cards());
    return now.every(function (id, i) { return id === state.shown[i]; });
  }

  function unplacedLabels() {
    if (isArena() || state.placed === 0 || state.placed >= cards().length) return [];
    return cards().slice(state.placed).map(function (c) { return c.dataset.label; });
  }

  function rationaleExcess() {
    var box = $("#rank-form textarea[name=rationale]");
    if (!box) return 0;
    var max = Number(box.dataset.maxChars || 0);
    var length = Array.from(box.value).length; /* characters as the server counts them */
    return max && length > max ? length - max : 0;
  }

  function refuse(event, message) {
    event.preventDefault();
    var error = $("#submit-error");
    error.textContent = "";
    var p = document.createElement("p");
    p.className = "error";
    p.setAttribute("role", "alert");
    p.textContent = message;
    error.appendChild(p);
  }

  function onConfirm(event) {
    if (!state || event.target !== $("#rank-form")) return; /* a button's own request (Give back) */
    var error = $("#submit-error");
    var excess = rationaleExcess();
    if (excess) {
      refuse(event, "Your rationale is " + excess + " character" + (excess === 1 ? "" : "s") +
        " over the limit. Shorten it, then submit again; nothing was cut.");
      return;
    }
    if (state.skip) return;
    var allBad = $("#all-bad").checked;
    var unplaced = unplacedLabels();
    if (!allBad && unplaced.length) {
      refuse(event, "Not submitted: response" + (unplaced.length > 1 ? "s " : " ") + unplaced.join(" and ") +
        (unplaced.length > 1 ? " are" : " is") + " not placed yet. Press " +
        (unplaced.length > 1 ? "their numbers" : "its number") +
        " best first, drag the cards, or press R to start over.");
      return;
    }
    if (isArena() && !allBad && !$("input[name=verdict]:checked")) {
      refuse(event, "Pick the better response (1 or 2), T for a tie, or B if both are bad.");
      return;
    }
    if (!isArena() && !allBad && unchangedOrder() && !state.warned) {
      event.preventDefault();
      error.textContent = "";
      state.warned = true;
      $("#unchanged-warning").hidden = false;
      return;
    }
    error.textContent = "";
  }

  function onConfigRequest(event) {
    if (event.target !== $("#rank-form")) return;
    event.detail.parameters["payload"] = JSON.stringify(buildPayload());
  }

  // ------------------------------------------------------------ drafts (see annotate-desk.js)

  function snapshot() {
    if (!state) return null;
    var verdict = $("input[name=verdict]:checked");
    return {
      order: ids(cards()),
      tied: cards().filter(function (c) { return c.dataset.tied === "true"; }).map(function (c) { return Number(c.dataset.responseId); }),
      placed: state.placed,
      warned: state.warned,
      flags: flags(),
      flag_note: field("flag_note"),
      rationale: field("rationale"),
      all_bad: $("#all-bad").checked,
      verdict: verdict ? verdict.value : ""
    };
  }

  function restore(draft) {
    if (!state || !draft) return false;
    var byId = {};
    cards().forEach(function (c) { byId[c.dataset.responseId] = c; });
    var order = (draft.order || []).map(String);
    var same = order.length === cards().length && order.every(function (id) { return byId[id]; });
    if (same) order.forEach(function (id) { list().appendChild(byId[id]); });
    var tied = (draft.tied || []).map(String);
    cards().forEach(function (c) {
      c.dataset.tied = same && tied.indexOf(c.dataset.responseId) >= 0 ? "true" : "false";
      var names = (draft.flags || {})[c.dataset.responseId] || [];
      var any = false;
      $all("input[name=flag]", c).forEach(function (box) { box.checked = names.indexOf(box.value) >= 0; any = any || box.checked; });
      if (any) $("fieldset.flags", c).hidden = false;
    });
    state.placed = same ? Math.min(draft.placed || 0, cards().length) : 0;
    state.warned = !!draft.warned;
    var note = $("#rank-form [name=flag_note]");
    if (note) note.value = draft.flag_note || "";
    var rationale = $("#rank-form [name=rationale]");
    if (rationale) { rationale.value = draft.rationale || ""; rationale.dispatchEvent(new Event("input")); }
    $("#all-bad").checked = !!draft.all_bad;
    $all("input[name=verdict]").forEach(function (r) { r.checked = r.value === draft.verdict; });
    syncFlagNote();
    update();
    return true;
  }

  window.PrefloopAnnotate = {
    snapshot: snapshot,
    restore: restore,
    submit: function () { submit(); },
    taskKey: function () { var t = task(); return t ? t.dataset.draftKey : null; }
  };

  function submit() {
    var form = $("#rank-form");
    if (form) form.requestSubmit();
  }

  function openSkip() {
    var dialog = $("#skip-dialog");
    if (!dialog.open) dialog.showModal();
  }

  function onSkipClose() {
    var dialog = $("#skip-dialog");
    if (dialog.returnValue !== "skip") return;
    var reason = ($("input[name=skip_reason]:checked", dialog) || {}).value || "Other";
    var detail = ($("input[name=skip_detail]", dialog).value || "").trim();
    if (reason === "Other" && !detail) {
      $("#submit-error").textContent = "Not skipped: say why in Details when you choose 'Other', then skip again.";
      return;
    }
    state.skip = detail ? reason + ": " + detail : reason;
    submit();
    state.skip = null;
  }

  // ------------------------------------------------------------ keyboard

  function typing(target) {
    if (!target || !target.tagName) return false;
    var tag = target.tagName.toLowerCase();
    if (tag === "textarea" || tag === "select") return true;
    if (tag === "input") return !/^(checkbox|radio|button|submit)$/i.test(target.type);
    return !!target.isContentEditable;
  }

  // An overlay dialog takes the focus when it opens (its Close button) and gives it back on close:
  // to what had it before, or, when that was nothing (the body) or is gone, to no element at all.
  // The focus never stays on a hidden button: Chromium drops it from there only at its next
  // rendering update, so document.activeElement would still point into the closed overlay.
  var focusBeforeOverlay = null;

  function setOverlay(el, open) {
    if (!el || el.hidden === !open) return;
    var dialog = el.getAttribute("role") === "dialog";
    if (open) {
      el.hidden = false;
      if (!dialog) return;
      var before = document.activeElement;
      focusBeforeOverlay = before && before !== document.body && !el.contains(before) ? before : null;
      var first = el.querySelector("button, [href], input, [tabindex]");
      if (first) first.focus();
      return;
    }
    if (dialog) {
      var back = focusBeforeOverlay;
      focusBeforeOverlay = null;
      if (back && document.contains(back)) back.focus();
      var active = document.activeElement;
      if (active && el.contains(active)) active.blur();
    }
    el.hidden = true;
  }

  function toggle(id) {
    var el = document.getElementById(id);
    if (el) setOverlay(el, el.hidden);
  }

  function closeOverlays() {
    var closed = false;
    ["help-overlay"].forEach(function (id) {
      var el = document.getElementById(id);
      if (el && !el.hidden) { setOverlay(el, false); closed = true; }
    });
    return closed;
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    var key = event.key;
    var signIn = $("#login-dialog");
    if (signIn && signIn.open) return; /* the sign-in dialog takes the keys */
    var dialog = $("#skip-dialog");
    if (dialog && dialog.open) {
      if (/^[1-9]$/.test(key)) {
        var reasons = $all("input[name=skip_reason]", dialog);
        var r = reasons[Number(key) - 1];
        if (r && !typing(event.target)) { r.checked = true; event.preventDefault(); }
      }
      return; // the dialog handles Enter (submit) and Escape (cancel) itself
    }
    if (key === "Escape") {
      if (typing(event.target)) { event.target.blur(); return; }
      var help = document.getElementById("help-overlay");
      if (help && !help.hidden) { setOverlay(help, false); return; }
      if (state) {
        state.pendingTie = false; state.pendingFlag = false;
        if (state.flagCard) toggleFlags(state.flagCard, false);
        update();
      }
      return;
    }
    if (typing(event.target)) return;
    if (key === "?") { toggle("help-overlay"); event.preventDefault(); return; }
    if (key === "g" || key === "G") { toggle("guidelines-panel"); event.preventDefault(); return; }
    if (!state || !task()) return;
    var lower = key.length === 1 ? key.toLowerCase() : key;

    if (state.flagCard && FLAG_KEYS[lower]) {
      var box = $("input[name=flag][value=" + FLAG_KEYS[lower] + "]", state.flagCard);
      box.checked = !box.checked;
      syncFlagNote();
      changed();
      event.preventDefault();
      return;
    }
    if (/^[1-9]$/.test(key)) {
      event.preventDefault();
      if (state.pendingFlag) {
        state.pendingFlag = false;
        var card = cardByLabel(key);
        if (card) toggleFlags(card, true);
        update();
        return;
      }
      if (isArena()) {
        var verdict = $("input[name=verdict][value='" + key + "']");
        if (verdict) { verdict.checked = true; update(); }
        return;
      }
      place(key);
      return;
    }
    switch (lower) {
      case "t":
        if (isArena()) { $("input[name=verdict][value=tie]").checked = true; update(); }
        else { state.pendingTie = true; update(); }
        break;
      case "f": state.pendingFlag = true; update(); break;
      case "b": $("#all-bad").checked = !$("#all-bad").checked; update(); break;
      case "s": openSkip(); break;
      case "r": reset(); break;
      case "Backspace": undo(); break;
      case "Enter":
        var tag = event.target && event.target.tagName ? event.target.tagName.toLowerCase() : "";
        if (tag === "button" || tag === "a") return; // let a focused button do its own thing
        submit();
        break;
      default:
        return;
    }
    event.preventDefault();
  }

  // ------------------------------------------------------------ clicks

  function onClick(event) {
    var target = event.target.closest ? event.target.closest("[data-action]") : null;
    if (!target) return;
    var action = target.dataset.action;
    if (action === "help") { toggle("help-overlay"); return; }
    if (action === "guidelines") { toggle("guidelines-panel"); return; }
    if (!state) return;
    var card = target.closest("li.response");
    if (action === "tie" && card) {
      card.dataset.tied = card.dataset.tied === "true" ? "false" : "true";
      state.warned = false;
      update();
    } else if (action === "flags" && card) {
      toggleFlags(card);
    } else if (action === "skip") {
      openSkip();
    } else if (action === "reset") {
      reset();
    }
  }

  document.addEventListener("keydown", onKey);
  document.addEventListener("click", onClick);
  document.addEventListener("DOMContentLoaded", init);
  document.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail && event.detail.target && event.detail.target.id === "task-area") {
      init();
      window.scrollTo(0, 0);
    }
  });
})();
