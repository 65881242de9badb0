"""Usage: python3 scripts/import_cycles.py .   (issue 9: no import circle inside a crate)

Module-level import cycles inside each crate: edges a -> b when a file of module a names
`crate::b...` or `super::...` resolving to b, ignoring ancestor/descendant pairs."""
import os,re,sys,itertools
from collections import defaultdict
root=sys.argv[1]
crates={'common':'common/src','worker':'worker/src','coordinator':'coordinator/src','cli':'cli/src'}
def modpath(src,f):
    rel=os.path.relpath(f,src)[:-3].split(os.sep)
    if rel[-1] in('mod','lib','main'): rel=rel[:-1]
    return tuple(rel)
bad=0
for crate,src in crates.items():
    src=os.path.join(root,src)
    files=[os.path.join(d,f) for d,_,fs in os.walk(src) for f in fs if f.endswith('.rs')]
    mods={modpath(src,f):f for f in files}
    def resolve(path):
        # longest known module prefix
        for k in range(len(path),0,-1):
            if tuple(path[:k]) in mods: return tuple(path[:k])
        return None
    edges=defaultdict(set)
    for m,f in mods.items():
        text=open(f).read()
        # strip test modules
        text=re.sub(r"//[^\n]*","",text)
        text=re.split(r'\n#\[cfg\(test\)\]\s*\n(?:#\[[^\n]*\]\s*\n)*mod tests',text)[0]
        for mt in re.finditer(r'\b(crate|super)((?:::\w+)+)',text):
            kind,rest=mt.group(1),mt.group(2).split('::')[1:]
            if kind=='crate': base=[]
            else:
                # super relative to the module m (file-level)
                base=list(m[:-1]); 
                while rest and rest[0]=='super': base=base[:-1]; rest=rest[1:]
            t=resolve(base+rest)
            if t is None or t==m: continue
            if t[:len(m)]==m or m[:len(t)]==t: continue  # ancestor/descendant
            edges[m].add(t)
    # cycles via SCC
    index={};low={};stack=[];on=set();sccs=[];i=[0]
    def strong(v):
        index[v]=low[v]=i[0];i[0]+=1;stack.append(v);on.add(v)
        for w in edges[v]:
            if w not in index: strong(w);low[v]=min(low[v],low[w])
            elif w in on: low[v]=min(low[v],index[w])
        if low[v]==index[v]:
            c=[]
            while True:
                w=stack.pop();on.discard(w);c.append(w)
                if w==v:break
            if len(c)>1: sccs.append(c)
    sys.setrecursionlimit(10000)
    for v in list(mods):
        if v not in index: strong(v)
    for c in sccs:
        bad+=1
        print(crate,'cycle:',' <-> '.join('::'.join(x) for x in c))
print('cycles:',bad)
