// An offline reference for the service: lists the operations of /openapi.json (FastAPI's own /docs page
// loads Swagger UI from a CDN, which this service does not use).
(function () {
  "use strict";
  var main = document.getElementById("api");
  var token = sessionStorage.getItem("taxonomist-token") || "";
  function el(tag, text, cls) { var e = document.createElement(tag); if (text) { e.textContent = text; } if (cls) { e.className = cls; } return e; }
  fetch("/openapi.json", { headers: token ? { "Authorization": "Bearer " + token } : {} }).then(function (r) {
    if (!r.ok) { throw new Error("HTTP " + r.status + (r.status === 401 ? " (a token is needed: open / and enter it)" : "")); }
    return r.json();
  }).then(function (spec) {
    main.textContent = "";
    main.appendChild(el("p", spec.info.title + " " + spec.info.version + " — " + (spec.info.description || ""), "muted"));
    Object.keys(spec.paths).forEach(function (path) {
      Object.keys(spec.paths[path]).forEach(function (method) {
        var op = spec.paths[path][method];
        var card = el("section", null, "card");
        var box = el("div", null, "answer");
        box.appendChild(el("h2", method.toUpperCase() + " " + path));
        if (op.summary) { box.appendChild(el("p", op.summary)); }
        var body = op.requestBody && op.requestBody.content;
        if (body) { box.appendChild(el("p", "Request body: " + Object.keys(body).join(", ") + " " + JSON.stringify((body[Object.keys(body)[0]].schema || {}).properties || {}), "muted")); }
        var list = el("ul");
        Object.keys(op.responses || {}).forEach(function (code) { list.appendChild(el("li", code + ": " + (op.responses[code].description || ""))); });
        box.appendChild(el("h3", "Responses")); box.appendChild(list);
        card.appendChild(box); main.appendChild(card);
      });
    });
  }).catch(function (e) { main.textContent = "Cannot load /openapi.json: " + e.message; });
}());
