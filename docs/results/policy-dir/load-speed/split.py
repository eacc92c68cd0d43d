import sys, time, gc
sys.path.insert(0, "benchmarks")
from config_load import service_policy
from meshlib.config import yamlsafe, loader
from meshlib.config.checker import check
text = service_policy(0, 10000)
yamlsafe.MAX_DOCUMENTS = 20000
def best(f, n=3):
    r = []
    for _ in range(n):
        t = time.thread_time(); f(); r.append(time.thread_time() - t)
    return round(min(r), 3)
def compose():
    l = yamlsafe._Loader(text); list(yamlsafe._compose_all(l)); l.dispose()
with loader.GC_PAUSE:
    print("compose (libyaml + PyYAML's Python node callbacks)", best(compose))
    print("read_documents (compose + fast pass)", best(lambda: yamlsafe.read_documents(text)))
    docs, _ = yamlsafe.read_documents(text)
    schema = loader.DOCUMENT_SCHEMAS["Service"]["meshlib/v1"]
    print("schema check of 10,000 documents", best(lambda: [check(d.value, schema, "", d.line, []) for d in docs]))
print("load_text", best(lambda: loader.load_text(text)))
