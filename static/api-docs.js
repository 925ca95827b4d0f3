// Starts Swagger UI (/docs) or Redoc (/redoc) on the page's #api-docs element, from the vendored
// bundles the page loaded before this file. A file of its own so the pages carry no inline script.
(function () {
  "use strict";
  const root = document.getElementById("api-docs");
  if (!root) return;
  const url = root.dataset.openapiUrl;
  if (root.dataset.viewer === "swagger-ui" && window.SwaggerUIBundle) {
    window.SwaggerUIBundle({
      url,
      domNode: root,
      deepLinking: true,
      presets: [window.SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",
    });
  } else if (root.dataset.viewer === "redoc" && window.Redoc) {
    // Redoc's search runs in a Web Worker made from a blob: URL; without it the page still works.
    window.Redoc.init(url, { disableSearch: false, hideDownloadButton: false }, root);
  }
})();
