"""A second implementation of rampart's Maglev table format (loadbalancer/src/maglev.rs),
written from the rules documented there rather than from the Rust code. The values it prints are pinned
in maglev.rs's `the_hash_is_pinned` test; any other implementation (e.g. one written for a
different language or tool) must print the same. Run: python3 reference/maglev.py
"""
M64=(1<<64)-1
def rotl(x,b): return ((x<<b)|(x>>(64-b)))&M64
def sip13(k0,k1,data):
    v0=k0^0x736f6d6570736575; v1=k1^0x646f72616e646f6d; v2=k0^0x6c7967656e657261; v3=k1^0x7465646279746573
    def rnd(v0,v1,v2,v3):
        v0=(v0+v1)&M64; v1=rotl(v1,13); v1^=v0; v0=rotl(v0,32)
        v2=(v2+v3)&M64; v3=rotl(v3,16); v3^=v2
        v0=(v0+v3)&M64; v3=rotl(v3,21); v3^=v0
        v2=(v2+v1)&M64; v1=rotl(v1,17); v1^=v2; v2=rotl(v2,32)
        return v0,v1,v2,v3
    n=len(data); end=n-n%8
    for i in range(0,end,8):
        m=int.from_bytes(data[i:i+8],'little'); v3^=m; v0,v1,v2,v3=rnd(v0,v1,v2,v3); v0^=m
    b=((n&0xff)<<56)|int.from_bytes(data[end:]+b'\0'*(8-(n-end)),'little')
    v3^=b; v0,v1,v2,v3=rnd(v0,v1,v2,v3); v0^=b
    v2^=0xff
    for _ in range(3): v0,v1,v2,v3=rnd(v0,v1,v2,v3)
    return v0^v1^v2^v3
le=lambda s:int.from_bytes(s,'little')
K0=le(b"rampart ")
OFF=(K0,le(b"mglv-off")); SKP=(K0,le(b"mglv-skp")); KEY=(K0,le(b"mglv-key"))
def populate(M,backs):
    backs=sorted([b for b in backs if b[2]>0],key=lambda b:b[1].encode())
    t=[None]*M
    nxt=[sip13(*OFF,b[1].encode())%M for b in backs]
    skip=[sip13(*SKP,b[1].encode())%(M-1)+1 for b in backs]
    mw=max(b[2] for b in backs); cr=[0]*len(backs); f=0
    while f<M:
        for i,b in enumerate(backs):
            cr[i]+=b[2]
            if cr[i]<mw: continue
            cr[i]-=mw
            while True:
                c=nxt[i]; nxt[i]=(nxt[i]+skip[i])%M
                if t[c] is None: t[c]=b[0]; f+=1; break
            if f==M: break
    return t
# Known answer of SipHash-1-3 (key 00..0f, empty message), as in Rust's own SipHasher13 tests.
print(hex(sip13(le(bytes(range(8))),le(bytes(range(8,16))),b"")))
b=[(i,"10.0.%d.%d:80"%(i//250,i%250+1),1) for i in range(3)]
print(populate(251,b)[:12])
h=sip13(*KEY,b"203.0.113.7")
print(h%251, [(h%251+k*((h//251)%250+1))%251 for k in range(4)])
b=[(i,"10.0.%d.%d:80"%(i//250,i%250+1),w) for i,w in enumerate([1,2,3,0,5])]
t=populate(65537,b)
print(sum((p+1)*(x+1) for p,x in enumerate(t))%(1<<64), [t.count(i) for i in range(5)])
