// Behaviour every page shares, kept out of the markup: the Content-Security-Policy runs no inline
// script or event-handler attribute.
(function () {
  // A form with data-confirm asks before it submits (promote, rollback, cancel).
  document.addEventListener("submit", function (event) {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) return;
    if (!window.confirm(form.dataset.confirm)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);
})();
