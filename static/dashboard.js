// authlink dashboard: the only script. Every page works without it; it adds
//  - copy buttons (`<button data-copy="input-id" hidden>` or `data-copy-value="text"`: shown only
//    when the script runs),
//  - confirmation dialogs (`<form data-confirm="question">`),
//  - the live preview on the branding page (`data-preview-*`).
// No inline code and no third-party resources: the Content-Security-Policy allows only this file.
(function () {
  'use strict';

  // Confirmation before revoke, rotate, disconnect, remove.
  document.addEventListener('submit', function (event) {
    var form = event.target;
    if (!(form instanceof HTMLFormElement)) return;
    var question = form.getAttribute('data-confirm');
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  // Copy buttons.
  function announce(button, text) {
    var row = button.parentNode;
    var status = row.querySelector('.copy-status');
    if (!status) {
      status = document.createElement('p');
      status.className = 'copy-status';
      status.setAttribute('role', 'status');
      row.appendChild(status);
    }
    status.textContent = text;
  }

  function fallbackCopy(input) {
    input.focus();
    input.select();
    try {
      return document.execCommand('copy');
    } catch (e) {
      return false;
    }
  }

  function copy(button) {
    var text = button.getAttribute('data-copy-value');
    var input = document.getElementById(button.getAttribute('data-copy'));
    if (text === null) {
      if (!input) return;
      text = input.value;
    }
    var done = function () { announce(button, 'Copied.'); };
    var manual = function () {
      if (input && fallbackCopy(input)) {
        done();
      } else if (input) {
        input.select();
        announce(button, 'Selected: press Ctrl+C (or ⌘C) to copy.');
      } else {
        announce(button, 'Copy this link: ' + text);
      }
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, manual);
    } else {
      manual();
    }
  }

  document.querySelectorAll('[data-copy], [data-copy-value]').forEach(function (button) {
    button.hidden = false;
    button.addEventListener('click', function () { copy(button); });
  });

  // Branding: live preview of the name and the accent colour.
  var preview = document.getElementById('brand-preview');
  if (preview) {
    var nameInput = document.querySelector('[data-preview-name]');
    var workspaceInput = document.getElementById('name');
    var accentInput = document.querySelector('[data-preview-accent]');
    var labels = preview.querySelectorAll('[data-preview-label]');
    var monogram = preview.querySelector('[data-preview-monogram]');

    var textOn = function (hex) {
      // WCAG relative luminance, the same rule the server uses.
      var channel = function (i) {
        var v = parseInt(hex.substr(i, 2), 16) / 255;
        return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
      };
      var l = 0.2126 * channel(1) + 0.7152 * channel(3) + 0.0722 * channel(5);
      return l > 0.179 ? '#000000' : '#ffffff';
    };

    var update = function () {
      var name = (nameInput && nameInput.value.trim()) || (workspaceInput && workspaceInput.value.trim()) || '';
      if (name) {
        labels.forEach(function (el) { el.textContent = name; });
        var first = Array.from(name).find(function (c) { return /[\p{L}\p{N}]/u.test(c); });
        if (monogram) monogram.textContent = first ? first.toUpperCase() : '';
      }
      var accent = accentInput ? accentInput.value.trim() : '';
      if (/^#[0-9a-fA-F]{6}$/.test(accent)) {
        // CSSOM changes are not inline styles: the CSP allows them.
        preview.style.setProperty('--accent', accent);
        preview.style.setProperty('--accent-text', textOn(accent));
      }
    };
    [nameInput, workspaceInput, accentInput].forEach(function (el) {
      if (el) el.addEventListener('input', update);
    });
  }
})();
