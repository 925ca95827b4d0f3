/* Around the ranking page (annotate.js): nothing an annotator does is lost, and long responses
 * compare well.
 * - Drafts: the ranking, ties, flags and rationale on screen are kept in localStorage under the
 *   task's key (#task data-draft-key) and restored when the task is shown again; dropped once the
 *   server has taken the judgement (or the task was given back).
 * - A lost session (HTTP 401: logged out in another tab, expired): the page keeps the judgement,
 *   says so where the eye is, and opens a sign-in dialog that posts to /login; once signed in, the
 *   same judgement is sent again (a repeated submission is stored once).
 * - The rationale's character counter (the server's limit is data-max-chars; nothing is cut).
 * - Compare layout: long responses show "Show all"; expand or collapse all; the bodies scroll
 *   together when they stand side by side.
 * No inline script anywhere: this file is loaded by templates/annotate/index.html. Plain ES2017. */
(function () {
  "use strict";

  var readyKey = null;   /* drafts are saved only for the task whose draft was looked at first */
  var inFlight = null;   /* the draft key of the request in flight */
  var afterSignIn = null;
  var syncing = false;

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }
  function api() { return window.PrefloopAnnotate; }
  function store() { try { return window.localStorage; } catch (e) { return null; } }

  // ------------------------------------------------------------ drafts

  function saveDraft() {
    var a = api(), s = store();
    if (!a || !s) return;
    var key = a.taskKey();
    if (!key || key !== readyKey) return;
    var snap = a.snapshot();
    if (!snap) return;
    snap.savedAt = Date.now();
    try { s.setItem(key, JSON.stringify(snap)); } catch (e) { /* full or disabled: the page still has it */ }
  }

  function dropDraft(key) {
    var s = store();
    if (s && key) { try { s.removeItem(key); } catch (e) { /* nothing to drop */ } }
  }

  /* Drafts of tasks never sent (an assignment that expired, a task given back in another browser)
   * would pile up: a week after their last change they go. */
  var DRAFT_PREFIX = "prefloop.draft.";
  var DRAFT_DAYS = 7;

  function pruneDrafts() {
    var s = store();
    if (!s) return;
    var cutoff = Date.now() - DRAFT_DAYS * 86400000;
    try {
      Object.keys(s).forEach(function (key) {
        if (key.indexOf(DRAFT_PREFIX) !== 0) return;
        var savedAt = 0;
        try { savedAt = JSON.parse(s.getItem(key)).savedAt || 0; } catch (e) { savedAt = 0; }
        if (savedAt < cutoff) s.removeItem(key);
      });
    } catch (e) { /* storage unavailable: nothing to prune */ }
  }

  function restoreDraft() {
    var a = api(), s = store();
    readyKey = a ? a.taskKey() : null;
    if (!readyKey || !s) return;
    var raw = null;
    try { raw = s.getItem(readyKey); } catch (e) { return; }
    if (!raw) return;
    var draft;
    try { draft = JSON.parse(raw); } catch (e) { dropDraft(readyKey); return; }
    if (a.restore(draft)) {
      var note = $("#draft-note");
      if (note) {
        var when = draft.savedAt ? new Date(draft.savedAt).toLocaleTimeString() : "earlier";
        note.textContent = "Restored your unsent work on this task (saved " + when + ").";
        note.hidden = false;
      }
    }
  }

  // ------------------------------------------------------------ messages where the eye is

  function say(message) {
    var area = $("#submit-error");
    if (!area) return;
    area.textContent = "";
    var p = document.createElement("p");
    p.className = "error";
    p.setAttribute("role", "alert");
    p.textContent = message;
    area.appendChild(p);
  }

  // ------------------------------------------------------------ signing in again

  function openSignIn(then) {
    afterSignIn = then;
    var dialog = $("#login-dialog");
    if (!dialog) { window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname)); return; }
    $("#login-dialog-error").textContent = "";
    if (!dialog.open) dialog.showModal();
    var password = $("input[name=password]", dialog);
    var username = $("input[name=username]", dialog);
    (username.value ? password : username).focus();
  }

  function onSignIn(event) {
    event.preventDefault();
    var form = event.target;
    var error = $("#login-dialog-error");
    var button = $("button[type=submit]", form);
    button.disabled = true;
    error.textContent = "";
    fetch(form.action, { method: "POST", body: new FormData(form), credentials: "same-origin", redirect: "manual" })
      .then(function (response) {
        /* A good login answers with a redirect; a wrong password with the form again (400). */
        if (response.type === "opaqueredirect" || (response.ok && response.redirected)) {
          $("input[name=password]", form).value = "";
          $("#login-dialog").close();
          var then = afterSignIn;
          afterSignIn = null;
          var area = $("#submit-error");
          if (area) area.textContent = "";
          if (then) then();
          return;
        }
        error.textContent = response.status === 400 ? "Unknown user or wrong password. Try again."
          : response.status === 429 ? "Too many attempts. Wait a minute, then try again."
          : "Signing in failed (HTTP " + response.status + "). Try again.";
      })
      .catch(function () { error.textContent = "The server cannot be reached. Your work is kept; try again in a moment."; })
      .then(function () { button.disabled = false; });
  }

  function onResponseError(event) {
    var xhr = event.detail.xhr;
    var elt = event.detail.elt;
    var form = $("#rank-form");
    if (xhr.status === 401) {
      var resend = form && elt === form;
      say("Not sent: your session has ended. Your judgement is kept on this page; sign in again to " +
        (resend ? "send it." : "go on."));
      openSignIn(resend ? function () { api().submit(); } : function () { window.location.reload(); });
      return;
    }
    if (form && (elt === form || form.contains(elt))) {
      say("Not sent: the server answered HTTP " + xhr.status + ". Your judgement is kept; try again in a moment.");
    }
  }

  function onSendError(event) {
    var form = $("#rank-form");
    if (form && (event.detail.elt === form || form.contains(event.detail.elt))) {
      say("Not sent: the server cannot be reached. Your judgement is kept; press Submit again when it is back.");
    }
  }

  // ------------------------------------------------------------ rationale counter

  function countRationale() {
    var box = $("#rank-form textarea[name=rationale]");
    var counter = $("#rationale-count");
    if (!box || !counter) return;
    var max = Number(box.dataset.maxChars || 0);
    var length = Array.from(box.value).length;
    var over = max && length > max;
    counter.textContent = length.toLocaleString("en") + " / " + max.toLocaleString("en") +
      (over ? " characters: " + (length - max).toLocaleString("en") + " over the limit, shorten it to submit" : " characters");
    counter.classList.toggle("over", !!over);
    box.setAttribute("aria-invalid", over ? "true" : "false");
  }

  // ------------------------------------------------------------ compare layout

  function sideBySide() { return window.matchMedia("(min-width: 900px)").matches; }

  function markLong() {
    $all("#ranking li.response").forEach(function (card) {
      var body = $(".response-body", card), button = $(".expand-toggle", card);
      if (!body || !button) return;
      var expanded = card.classList.contains("expanded");
      button.hidden = !expanded && body.scrollHeight <= body.clientHeight + 4;
    });
  }

  function expand(card, open) {
    card.classList.toggle("expanded", open);
    var button = $(".expand-toggle", card);
    if (button) {
      button.setAttribute("aria-expanded", open ? "true" : "false");
      button.textContent = open ? "Show less" : "Show all";
    }
  }

  function onCompareClick(event) {
    var target = event.target.closest ? event.target.closest("[data-compare]") : null;
    if (!target) return;
    var action = target.dataset.compare;
    if (action === "expand") {
      var card = target.closest("li.response");
      expand(card, !card.classList.contains("expanded"));
    } else if (action === "expand-all" || action === "collapse-all") {
      $all("#ranking li.response").forEach(function (c) { expand(c, action === "expand-all"); });
    }
    markLong();
  }

  function onBodyScroll(event) {
    var source = event.target;
    if (syncing || !source.classList || !source.classList.contains("response-body")) return;
    var sync = $("#sync-scroll");
    if (!sync || !sync.checked || !sideBySide()) return;
    var range = source.scrollHeight - source.clientHeight;
    var fraction = range > 0 ? source.scrollTop / range : 0;
    syncing = true;
    $all("#ranking .response-body").forEach(function (body) {
      if (body === source) return;
      var r = body.scrollHeight - body.clientHeight;
      if (r > 0) body.scrollTop = Math.round(fraction * r);
    });
    window.requestAnimationFrame(function () { syncing = false; });
  }

  // ------------------------------------------------------------ wiring

  function init() {
    restoreDraft();
    countRationale();
    markLong();
  }

  document.addEventListener("DOMContentLoaded", function () {
    pruneDrafts();
    var signIn = $("#login-dialog-form");
    if (signIn) signIn.addEventListener("submit", onSignIn);
    var cancel = $("[data-login=cancel]");
    if (cancel) cancel.addEventListener("click", function () { $("#login-dialog").close(); });
    init();
  });
  document.addEventListener("prefloop:changed", saveDraft);
  document.addEventListener("input", function (event) {
    if (event.target && event.target.name === "rationale") countRationale();
    if (event.target && event.target.closest && event.target.closest("#rank-form")) saveDraft();
  });
  document.addEventListener("change", function (event) {
    if (event.target && event.target.closest && event.target.closest("#rank-form")) saveDraft();
  });
  document.addEventListener("click", onCompareClick);
  document.addEventListener("scroll", onBodyScroll, true); /* scroll does not bubble: capture it */
  window.addEventListener("resize", markLong);

  document.addEventListener("htmx:beforeRequest", function () {
    var a = api();
    inFlight = a ? a.taskKey() : null;
  });
  /* Taken: a judgement (or a give-back) whose answer swaps in the next task; a refusal is retargeted
   * to the error area instead. Seen before the swap, while the form is still in the page. */
  document.addEventListener("htmx:beforeSwap", function (event) {
    var d = event.detail;
    if (!d.target || d.target.id !== "task-area" || !d.shouldSwap) return;
    var elt = d.requestConfig && d.requestConfig.elt;
    if (!d.isError && elt && (elt.id === "rank-form" || (elt.classList && elt.classList.contains("release")))) {
      dropDraft(inFlight);
    }
    readyKey = null;
  });
  /* A saved revision answers with HX-Redirect (no swap). */
  document.addEventListener("htmx:afterRequest", function (event) {
    var xhr = event.detail.xhr;
    if (event.detail.successful && xhr && xhr.getResponseHeader("HX-Redirect")) dropDraft(inFlight);
  });
  document.addEventListener("htmx:responseError", onResponseError);
  document.addEventListener("htmx:sendError", onSendError);
  document.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail && event.detail.target && event.detail.target.id === "task-area") init();
  });
})();
