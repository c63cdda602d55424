"""Argo Workflow / WorkflowTemplate lint (template types, template and parameter references) and the manifests of
their ``resource`` templates with the ``{{...}}`` placeholders filled in."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

from pipelines.cluster.schemas import shorten

_TEMPLATE_TYPES = ("container", "script", "dag", "steps", "resource", "suspend", "data", "http", "plugin",
                   "containerSet")
_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")


def _templates_of(doc: Mapping) -> dict[str, dict]:
    templates = ((doc.get("spec") or {}).get("templates")) or []
    return {t["name"]: t for t in templates if isinstance(t, Mapping) and isinstance(t.get("name"), str)}


def _find_workflow_template(docs: list[dict], name: str | None) -> Mapping | None:
    for doc in docs:
        if isinstance(doc, Mapping) and doc.get("kind") == "WorkflowTemplate" and \
                (doc.get("metadata") or {}).get("name") == name:
            return doc
    return None


def _effective_spec(doc: Mapping, docs: list[dict]) -> tuple[dict, dict[str, dict], dict[str, dict]] | None:
    """(spec, templates by name, workflow parameters by name) with a workflowTemplateRef merged in; None if the
    referenced WorkflowTemplate is not among ``docs`` (then nothing can be checked offline)."""
    spec = dict(doc.get("spec") or {})
    params = {p["name"]: dict(p) for p in (spec.get("arguments") or {}).get("parameters") or [] if "name" in p}
    templates = _templates_of(doc)
    ref = spec.get("workflowTemplateRef")
    if isinstance(ref, Mapping):
        base = _find_workflow_template(docs, ref.get("name"))
        if base is None or ref.get("clusterScope"):
            return None
        base_spec = base.get("spec") or {}
        merged = {p["name"]: dict(p) for p in (base_spec.get("arguments") or {}).get("parameters") or []}
        for name, param in params.items():  # the Workflow's values override the template's defaults
            merged[name] = {**merged.get(name, {}), **param}
        params, templates = merged, {**_templates_of(base), **templates}
        spec = {**base_spec, **{k: v for k, v in spec.items() if k != "workflowTemplateRef"}}
    return spec, templates, params


def workflow_problems(doc: Mapping, docs: list[dict]) -> Iterator[str]:
    """Argo's own lint: template types, references (entrypoint, steps, DAG tasks, onExit) and parameter references."""
    effective = _effective_spec(doc, docs)
    if effective is None:
        return  # its WorkflowTemplate lives in the cluster: nothing to resolve offline
    spec, templates, params = effective
    names = [t.get("name") for t in (doc.get("spec") or {}).get("templates") or [] if isinstance(t, Mapping)]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        yield f"spec.templates: template name {dup!r} is defined more than once"
    entry = spec.get("entrypoint")
    if entry is None and doc.get("kind") == "Workflow":
        yield "spec.entrypoint: required (the template the Workflow starts with)"
    elif entry is not None and entry not in templates:
        yield f"spec.entrypoint: template {entry!r} does not exist"
    if spec.get("onExit") is not None and spec["onExit"] not in templates:
        yield f"spec.onExit: template {spec['onExit']!r} does not exist"
    if doc.get("kind") == "Workflow":
        for name, param in params.items():
            if "value" not in param and "valueFrom" not in param:
                yield f"spec.arguments.parameters[{name}]: no value (the Workflow must supply one)"
    for tname, template in _templates_of(doc).items():
        yield from _template_problems(tname, template, templates, params, docs)


def _template_problems(tname: str, template: Mapping, templates: Mapping[str, dict], params: Mapping[str, dict],
                       docs: list[dict]) -> Iterator[str]:
    path = f"spec.templates[{tname}]"
    kinds = [k for k in _TEMPLATE_TYPES if template.get(k) is not None]
    if len(kinds) != 1:
        yield f"{path}: must have exactly one template type ({', '.join(_TEMPLATE_TYPES)}), has {kinds or 'none'}"
    inputs = {p.get("name"): p for p in (template.get("inputs") or {}).get("parameters") or []}
    calls: list[tuple[str, Mapping]] = []
    if isinstance(template.get("steps"), list):
        step_names = set()
        for g, group in enumerate(template["steps"]):
            for s, step in enumerate(group if isinstance(group, list) else []):
                calls.append((f"{path}.steps[{g}][{s}]", step))
                step_names.add(step.get("name"))
        for ref in _references(template, "steps"):
            if ref not in step_names:
                yield f"{path}: '{{{{steps.{ref}...}}}}' refers to no step of this template"
    dag = template.get("dag")
    if isinstance(dag, Mapping):
        task_names = {t.get("name") for t in dag.get("tasks") or []}
        for t, task in enumerate(dag.get("tasks") or []):
            calls.append((f"{path}.dag.tasks[{t}]", task))
            if task.get("depends") and task.get("dependencies"):
                yield f"{path}.dag.tasks[{t}]: cannot use both 'depends' and 'dependencies'"
            wanted = list(task.get("dependencies") or [])
            wanted += re.findall(r"[A-Za-z0-9_-]+(?=\.|\s|\)|$)", re.sub(r"\.[A-Za-z]+", " ", task.get("depends") or ""))
            for dep in wanted:
                if dep not in task_names and dep not in ("&&", "||"):
                    yield f"{path}.dag.tasks[{t}]: dependency {dep!r} is not a task of this DAG"
        for ref in _references(template, "tasks"):
            if ref not in task_names:
                yield f"{path}: '{{{{tasks.{ref}...}}}}' refers to no task of this DAG"
    for where, call in calls:
        yield from _call_problems(where, call, templates, docs)
    for ref in _references(template, "inputs.parameters"):
        if ref not in inputs:
            yield f"{path}: '{{{{inputs.parameters.{ref}}}}}' is not an input parameter of this template"
    for ref in _references(template, "workflow.parameters"):
        if ref not in params:
            yield f"{path}: '{{{{workflow.parameters.{ref}}}}}' is not a workflow parameter"


def _call_problems(where: str, call: Mapping, templates: Mapping[str, dict], docs: list[dict]) -> Iterator[str]:
    if call.get("inline") is not None:
        return
    target: Mapping | None = None
    if call.get("template") is not None:
        target = templates.get(call["template"])
        if target is None:
            yield f"{where}.template: {call['template']!r} does not exist"
            return
    elif isinstance(call.get("templateRef"), Mapping):
        ref = call["templateRef"]
        base = None if ref.get("clusterScope") else _find_workflow_template(docs, ref.get("name"))
        if base is None:
            return  # lives in the cluster
        target = _templates_of(base).get(ref.get("template"))
        if target is None:
            yield f"{where}.templateRef: WorkflowTemplate {ref.get('name')!r} has no template {ref.get('template')!r}"
            return
    else:
        yield f"{where}: needs 'template', 'templateRef' or 'inline'"
        return
    given = {p.get("name") for p in (call.get("arguments") or {}).get("parameters") or []}
    for param in (target.get("inputs") or {}).get("parameters") or []:
        if param.get("name") not in given and "value" not in param and "default" not in param:
            yield f"{where}.arguments.parameters: input {param.get('name')!r} of {target.get('name')!r} is not supplied"


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _references(template: Mapping, scope: str) -> set[str]:
    """Names X in ``{{<scope>.X...}}`` placeholders anywhere in the template (including expressions ``{{=...}}``)."""
    pattern = re.compile(r"\b" + re.escape(scope) + r"\.([A-Za-z0-9_-]+)")
    found = set()
    for text in _strings(template):
        for expression in _PLACEHOLDER.findall(text):
            found.update(pattern.findall(expression))
    return found


def template_inputs(doc: Mapping, docs: list[dict]) -> dict[str, dict[str, str]]:
    """``{template name: {input: value}}``: what the first call of each template of a Workflow / WorkflowTemplate
    receives, followed from the entrypoint through steps and DAG tasks. A step's arguments get its caller's inputs,
    the workflow parameters' values (or defaults) and ``{{item}}`` (the first of its ``withItems``, or of the JSON
    list its ``withParam`` names) filled in; a template no step reaches gets its inputs' defaults."""
    effective = _effective_spec(doc, docs)
    if effective is None:
        return {}
    spec, templates, params = effective
    workflow_values = {name: str(p.get("value", p.get("default", ""))) for name, p in params.items()}

    def defaults(template: Mapping) -> dict[str, str]:
        return {p.get("name"): str(p.get("value", p.get("default", "")))
                for p in (template.get("inputs") or {}).get("parameters") or []}

    found: dict[str, dict[str, str]] = {}
    pending = [(spec.get("entrypoint"), {})]
    while pending:
        name, inputs = pending.pop(0)
        if name in found or name not in templates:
            continue
        found[name] = inputs
        template = templates[name]
        calls = [c for group in template.get("steps") or [] for c in group]
        calls += list((template.get("dag") or {}).get("tasks") or [])
        for call in calls:
            item = _first_item(call, inputs, workflow_values)
            args = {p.get("name"): _fill(str(p.get("value", "")), inputs, workflow_values, item)
                    for p in (call.get("arguments") or {}).get("parameters") or []}
            target = templates.get(call.get("template"))
            if target is not None:
                pending.append((call.get("template"), {**defaults(target), **args}))
    for name, template in templates.items():
        found.setdefault(name, {k: _fill(v, {}, workflow_values) for k, v in defaults(template).items()})
    return found


def _first_item(call: Mapping, inputs: Mapping[str, str], workflow: Mapping[str, str]) -> str | None:
    items = call.get("withItems")
    if isinstance(call.get("withParam"), str):
        try:
            items = json.loads(_fill(call["withParam"], inputs, workflow))
        except ValueError:
            items = None
    if not isinstance(items, list) or not items:
        return None
    return items[0] if isinstance(items[0], str) else json.dumps(items[0])


def embedded_manifests(doc: Mapping, docs: list[dict]) -> Iterator[tuple[str, int, dict | str]]:
    """``(template name, index, manifest)`` of a Workflow's / WorkflowTemplate's ``resource`` templates.

    ``{{workflow.parameters.X}}`` and ``{{inputs.parameters.X}}`` are filled from the parameters' values or defaults
    and the arguments the template is called with (``template_inputs``), anything else (``{{workflow.name}}``, ...)
    with the word ``sample``; a manifest that is no YAML then comes back as an error string instead of a dict.
    """
    effective = _effective_spec(doc, docs)
    if effective is None:
        return
    _, _, params = effective
    workflow_values = {name: str(p.get("value", p.get("default", ""))) for name, p in params.items()}
    inputs = template_inputs(doc, docs)
    for tname, template in _templates_of(doc).items():
        manifest = (template.get("resource") or {}).get("manifest")
        if not isinstance(manifest, str):
            continue
        try:
            embedded = [d for d in yaml.safe_load_all(_fill(manifest, inputs.get(tname, {}), workflow_values)) if d]
        except yaml.YAMLError as err:
            yield tname, 0, f"not valid YAML once parameters are filled in: {shorten(str(err))}"
            continue
        for index, manifest_doc in enumerate(embedded):
            yield tname, index, manifest_doc


def _fill(text: str, inputs: Mapping[str, str], workflow: Mapping[str, str], item: str | None = None) -> str:
    def one(match: re.Match) -> str:
        expression = match.group(1)
        if expression.startswith("inputs.parameters.") and expression[18:] in inputs:
            return inputs[expression[18:]]
        if expression.startswith("workflow.parameters.") and expression[20:] in workflow:
            return workflow[expression[20:]]
        if expression == "item" and item is not None:
            return item
        return "sample"  # workflow.name, workflow.uid, ...: any DNS-safe word stands in

    return _PLACEHOLDER.sub(one, text)
